"""Files -> tensors: annotation JSON, synthetic scenes, image transforms, tokenizer, collation."""

from .formats import Batch, DataError, PairDataset, PretrainCollator, RetrievalDataset, load_annotations
from .tokenizer import TextTokenizer, load_tokenizer, train_wordpiece
from .transforms import ImageTransform

__all__ = ["Batch", "DataError", "ImageTransform", "PairDataset", "PretrainCollator", "RetrievalDataset",
           "TextTokenizer", "load_annotations", "load_tokenizer", "train_wordpiece"]
