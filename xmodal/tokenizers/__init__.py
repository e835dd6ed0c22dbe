"""Tokenizers as plug-ins: the protocol (base.py), the Unicode word tokenizer (word.py), the
Hugging Face subword tokenizer (subword.py), and config/state → tokenizer (build.py).

Any class following the protocol of base.py can be named by ``data.tokenizer._target_``. This
package imports nothing heavy: the ``tokenizers`` library is loaded when a subword tokenizer is built.
"""

from xmodal.tokenizers.base import Tokenizer
from xmodal.tokenizers.build import fit_tokenizer, task_tokenizer, tokenizer_from_state
from xmodal.tokenizers.word import WordTokenizer

__all__ = ["Tokenizer", "WordTokenizer", "fit_tokenizer", "task_tokenizer", "tokenizer_from_state"]
