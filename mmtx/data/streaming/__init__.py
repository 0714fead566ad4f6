"""Data bigger than memory, read: a folder prepared once into shards (`mmtx.data.shards`, `python -m mmtx.prepare`)
streamed by loader workers from a local or shared disk, or from S3.

    python -m mmtx.prepare data=imagefolder data.source.path=/data/imagenet out=/shards/imagenet
    python -m mmtx.train task=vit_cifar data=streaming data.path=/shards/imagenet      # or s3://bucket/imagenet

Loader workers decode images to the pixels the cached path decodes (torchvision's decoder; the cached path's
Pillow reader for an image to resize), and the batch goes through `ImageDataModule`'s device-side augmentation and
normalisation; audio clips (`StreamingAudio`, `data=streaming_audio`) are decoded, resampled and cropped as the
cached path does it; translation pairs (`StreamingPairs`, `data=streaming_pairs`) come as token ids with their
vocabularies, speech-to-text pairs as clips decoded in the workers with their transcripts' ids. litdata gives each
DDP rank its own samples and saves the loader's position in the checkpoint. Text is tokenized into memory-mapped
token files instead (`mmtx.data.text`).

One module a modality (`images`, `audio`, `pairs`) on what they share (`base`: the prepared folder, its checks,
S3, the loader and its position); `auto`: a source too large to hold, prepared in the cache and streamed.
"""

from mmtx.data.streaming.audio import StreamingAudio
from mmtx.data.streaming.auto import streamed_if_too_large
from mmtx.data.streaming.base import read_s3
from mmtx.data.streaming.images import StreamingImages
from mmtx.data.streaming.pairs import StreamingPairs

__all__ = ["StreamingAudio", "StreamingImages", "StreamingPairs", "read_s3", "streamed_if_too_large"]
