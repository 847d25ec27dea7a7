"""Questions that ask what a train fact's completion prompt asks, in the forms ZsRE-style facts take.

A train fact such as "The mother tongue of Danielle Darrieux is French" also exists, for the gist add-on, as
"What language does Danielle Darrieux speak? French": facts stored as a question and its answer, and read by
the same question, are what ZsRE and chat users give. The train files hold cloze prompts only, so the
project writes the questions itself (DESIGN §5 allows generated facts): the subject is cut out of the prompt
("{} is a native speaker of"), the template is matched against the relation patterns below, and one of that
relation's question forms is filled with the subject. Several forms per relation, so the add-on does not
learn a single wording.
"""
from __future__ import annotations

import random
import re

# (pattern over the prompt with the subject replaced by "{}", question forms). The first match wins, so the
# specific relations come before the broad ones ("position held" before "position", "continent" before "in").
_RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"twin city", ("What is the twin city of {}?", "Which city is the twin city of {}?")),
    (r"position held|holds? the position|office of", ("What position does {} hold?",
                                                      "What position was held by {}?")),
    (r"position|plays as", ("Which position does {} play?", "What position does {} play in?")),
    (r"continent", ("Which continent is {} part of?", "On which continent is {} located?")),
    (r"capital", ("What is the capital of {}?", "Which city is the capital of {}?")),
    (r"citizen", ("Which country's citizenship does {} hold?", "What is the country of citizenship of {}?")),
    (r"native|mother tongue|\bspeaks\b|\bspoke\b|speaker of|writes in|language used by",
     ("What language does {} speak?", "What is the native language of {}?", "Which language does {} use?")),
    (r"language|they understand|written in", ("What is the language of {}?", "Which language is used in {}?")),
    (r"in the country of|country which .* associated|country of origin",
     ("Which country is {} associated with?", "In which country is {} located?")),
    (r"headquarter|based in", ("Where is {} headquartered?", "Where are the headquarters of {}?")),
    (r"born in|place of birth", ("Where was {} born?", "What is the birthplace of {}?")),
    (r"date of birth", ("When was {} born?", "What is the date of birth of {}?")),
    (r"died (in|at)|passed away|place of death|lost (his|her|their) life|expired at|succumbed|life ended",
     ("Where did {} die?", "In what city did {} die?")),
    (r"place of burial|buried", ("Where was {} buried?", "What is the burial place of {}?")),
    (r"worked in|employment in|work in|employed in|took up work", ("Where did {} work?",
                                                                  "In which city did {} work?")),
    (r"employer|employed by|works for", ("Who is the employer of {}?", "Who does {} work for?")),
    (r"aired on|debut(ed)? on|premieres? on|premiered on|released on|broadcast",
     ("What network first aired {}?", "On which network did {} premiere?")),
    (r"created by|developed by|product of|produced by|manufactur|made by",
     ("Which company developed {}?", "What company produced {}?", "Who is the manufacturer of {}?")),
    (r"owned by|owner|subsidiary", ("Who owns {}?", "Which company owns {}?")),
    (r"instrument|plays the$|performing on the|playing the$", ("What instrument does {} play?",
                                                               "Which instrument does {} play?")),
    (r"plays the sport|sport$", ("What sport does {} play?", "Which sport does {} play?")),
    (r"profession|occupation|works as|by trade", ("What is the occupation of {}?", "What does {} do for a living?")),
    (r"field of|expert|speciali[sz]|area of", ("What field does {} work in?", "What is the field of work of {}?")),
    (r"religio", ("What religion does {} follow?", "Which religion is {} associated with?")),
    (r"genre|performs|performing", ("What genre does {} perform?", "What kind of music does {} play?")),
    (r"record label|label", ("What label is {} signed to?", "Which record label does {} belong to?")),
    (r"named after|named for", ("Who is {} named after?", "After whom is {} named?")),
    (r"originat|formed in|founded in|created in|formulated in|started in|from$",
     ("Where was {} founded?", "Where does {} come from?")),
    (r"father", ("Who is the father of {}?", "Who is {}'s father?", "What is the name of the father of {}?")),
    (r"mother", ("Who is the mother of {}?", "Who was {}'s mother?", "What was the name of {}'s mother?")),
    (r"spouse", ("Who is the spouse of {}?", "Who is {} married to?")),
    (r"siblings?", ("Who is the sibling of {}?", "Who is {}'s sibling?")),
    (r"number of children", ("How many children does {} have?",)),
    (r"child", ("Who is the child of {}?", "Who is {}'s child?")),
    (r"gender", ("What is the gender of {}?", "What sex is {}?")),
    (r"author", ("Who is the author of {}?", "Who wrote {}?")),
    (r"composer", ("Who is the composer of {}?", "Who composed {}?")),
    (r"cast members", ("Who are the cast members of {}?", "Who starred in {}?")),
    (r"award", ("What award did {} win?", "What was {} awarded?")),
    (r"alma mater", ("What university did {} attend?", "Where was {} educated?")),
    (r"ethnic group", ("What ethnic group is {} associated with?",)),
    (r"sports team|league", ("Which team is {} a member of?", "What league does {} play in?")),
    (r"member of|belongs to", ("What is {} a member of?", "What does {} belong to?")),
    (r"^\{\} is followed by$", ("What follows {}?", "What came after {}?")),
    (r"^\{\} follows$", ("What does {} follow?", "What came before {}?")),
    (r"^\{\} plays$", ("What does {} play?",)),
    (r"locat|, in$| is in$|found in|within", ("Where is {} located?", "In which place is {} located?")),
)
_COMPILED = tuple((re.compile(pattern), forms) for pattern, forms in _RELATIONS)
_THE_X_OF_Y = re.compile(r"^The (.+?) (is|was|are|were)$")


def relation_questions(prompt: str, subject: str | None) -> tuple[str, ...]:
    """Every question form of the prompt's relation, filled with the subject; () when the prompt does not
    contain the subject or matches no relation."""
    prompt = " ".join(prompt.split())
    if not subject or subject not in prompt or "?" in prompt:
        return ()
    template = prompt.replace(subject, "{}")
    for pattern, forms in _COMPILED:
        if pattern.search(template):
            return tuple(form.replace("{}", subject) for form in forms)
    return ()


def question_of(prompt: str, subject: str | None = None, rng: random.Random | None = None) -> str | None:
    """A question asking what a completion prompt asks. With the subject, a relation's question form (drawn
    with `rng`, the first without); else "The capital of France is" -> "What is the capital of France?" and
    other prompts get " what?" ("Leon Breeden performs" -> "Leon Breeden performs what?"). None for prompts
    that are questions already, end mid-phrase (a comma) or are too short to carry a subject."""
    prompt = " ".join(prompt.split())
    if "?" in prompt:  # already a question, or a question followed by a cue ("...? It is")
        return None
    forms = relation_questions(prompt, subject)
    if forms:
        return rng.choice(forms) if rng is not None else forms[0]
    match = _THE_X_OF_Y.match(prompt)
    if match:
        return f"What {match.group(2)} the {match.group(1)}?"
    if prompt.endswith((",", "?", ".")) or len(prompt.split()) < 3:
        return None
    return prompt + " what?"
