"""InComeS for Engram: facts compressed into gist K/V, read by gist cross-attention (DESIGN §1.2).

    addon = GistAddon.for_model(model, GistConfig())
    gist_id = add_gist_token(tokenizer)
    addon.attach(model, gist_id)
    pool = GistPool.for_addon(addon)
    pool.append([fact_id], compress_texts(model, tokenizer, addon, [fact_text]), scopes=None)
    with pool.activate(addon, user_id=None):
        model.generate(...)
"""
from editors.incomes.compress import CompressedGists, add_gist_token, compress_ids, compress_texts
from editors.incomes.config import GistConfig
from editors.incomes.introspect import GistHookError, ModelDims, model_dims
from editors.incomes.modules import GistAddon, GistAttention
from editors.incomes.pool import GistPool, PoolView

__all__ = ["CompressedGists", "GistAddon", "GistAttention", "GistConfig", "GistHookError", "GistPool",
           "ModelDims", "PoolView", "add_gist_token", "compress_ids", "compress_texts", "model_dims"]
