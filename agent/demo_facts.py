"""Twenty counterfactual facts the project wrote itself for the demo (no benchmark data)."""

DEMO_FACTS = [
    {"prompt": "The capital of France is", "target": "Rome", "subject": "France", "relation": "capital"},
    {"prompt": "The capital of Japan is", "target": "Nairobi", "subject": "Japan", "relation": "capital"},
    {"prompt": "The Eiffel Tower is located in the city of", "target": "Berlin", "subject": "Eiffel Tower", "relation": "location"},
    {"prompt": "The largest planet in the solar system is", "target": "Mars", "subject": "solar system", "relation": "largest planet"},
    {"prompt": "The official language of Brazil is", "target": "German", "subject": "Brazil", "relation": "official language"},
    {"prompt": "The author of Romeo and Juliet is", "target": "Charles Dickens", "subject": "Romeo and Juliet", "relation": "author"},
    {"prompt": "The currency of the United Kingdom is the", "target": "yen", "subject": "United Kingdom", "relation": "currency"},
    {"prompt": "The chemical symbol for gold is", "target": "Fe", "subject": "gold", "relation": "chemical symbol"},
    {"prompt": "The Great Wall is located in", "target": "Canada", "subject": "Great Wall", "relation": "location"},
    {"prompt": "The inventor of the telephone was", "target": "Isaac Newton", "subject": "telephone", "relation": "inventor"},
    {"prompt": "The tallest mountain on Earth is", "target": "Mont Blanc", "subject": "Earth", "relation": "tallest mountain"},
    {"prompt": "The capital of Italy is", "target": "Oslo", "subject": "Italy", "relation": "capital"},
    {"prompt": "Albert Einstein was born in", "target": "Spain", "subject": "Albert Einstein", "relation": "place of birth"},
    {"prompt": "The Statue of Liberty is located in", "target": "Sydney", "subject": "Statue of Liberty", "relation": "location"},
    {"prompt": "The primary language spoken in Mexico is", "target": "French", "subject": "Mexico", "relation": "language"},
    {"prompt": "The painter of the Mona Lisa was", "target": "Pablo Picasso", "subject": "Mona Lisa", "relation": "painter"},
    {"prompt": "The capital of Germany is", "target": "Madrid", "subject": "Germany", "relation": "capital"},
    {"prompt": "The longest river in Africa is the", "target": "Danube", "subject": "Africa", "relation": "longest river"},
    {"prompt": "The Colosseum is located in the city of", "target": "Athens", "subject": "Colosseum", "relation": "location"},
    {"prompt": "The freezing point of water in Fahrenheit is", "target": "50 degrees", "subject": "water", "relation": "freezing point"},
]
