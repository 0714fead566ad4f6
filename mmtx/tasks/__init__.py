"""Task families, one file each: what a task adds to the shared backbone (tokenizer, head, loss,
metrics and its decode entry). `mmtx.module.MmtxModule` runs one or more of them on one backbone."""

from mmtx.tasks.base import StepContext, TaskPart, TiedOutput
from mmtx.tasks.classification import Classification
from mmtx.tasks.contrastive import Contrastive
from mmtx.tasks.image_gpt import ImageGPT
from mmtx.tasks.language_model import LanguageModel
from mmtx.tasks.masked import Masked
from mmtx.tasks.prefix_lm import PrefixLM
from mmtx.tasks.seq2seq import Seq2Seq

__all__ = ["Classification", "Contrastive", "ImageGPT", "LanguageModel", "Masked", "PrefixLM", "Seq2Seq", "StepContext", "TaskPart", "TiedOutput"]
