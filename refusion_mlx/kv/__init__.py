"""The KV cache, in one home: its layout, one sequence's buffers, a batch's buffers, attention over
them, and the prompt cache that outlives a request.

* ``layout.SlotLayout``  host bookkeeping: committed length, entry positions, forward views, moves;
* ``single.SlotCache``   a layout with one sequence's buffers (moves applied at once);
* ``batch.BatchCache``   a batch's buffers, one row per sequence, rows loaded from and extracted to
                         ``SlotCache``s;
* ``attention``          the one attention dispatch the model calls;
* ``prompt.PromptCache`` a ``SlotCache`` kept across requests, with the tokens it holds;
* ``files``              prompt caches saved to and loaded from safetensors files.
"""

from .layout import QUERY_BUCKET, CacheFull, CacheView, SlotLayout, key_bucket
from .single import LayerCache, SlotCache
from .batch import BatchCache, BatchView, PackedRows
from .prompt import PromptCache, make_prompt_cache
from .files import load_prompt_cache, save_prompt_cache

__all__ = ["QUERY_BUCKET", "BatchCache", "BatchView", "CacheFull", "CacheView", "LayerCache", "PackedRows", "PromptCache", "load_prompt_cache", "make_prompt_cache", "save_prompt_cache",
           "SlotCache", "SlotLayout", "key_bucket"]
