"""Whisper's weights on mmtx's encoder-decoder (mmtx.whisper), offline: a WhisperForConditionalGeneration with
random weights from a small config stands in for the hub's; its front end, encoder output and decoder logits
are compared with mmtx's in fp32 on the CPU."""

import pytest
import torch
from torch import nn

from mmtx.backbone import Backbone
from mmtx.errors import ConfigError
from mmtx.tasks.seq2seq import TextDecoder
from mmtx.tokenizers.audio import MelTokenizer
from mmtx.whisper import whisper_state

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4
SHAPE = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=48)


def reference() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(vocab_size=300, num_mel_bins=80, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, decoder_start_token_id=1, **SHAPE)
    return transformers.WhisperForConditionalGeneration(config).eval()


def mmtx_whisper(arch: dict) -> nn.Module:
    """The parts an asr run builds, named as in its checkpoints (backbone, tasks.main.tokenizer/decoder)."""
    dim = arch["backbone.dim"]
    common = dict(mlp_ratio=arch["backbone.mlp_ratio"], norm_eps=arch["backbone.norm_eps"],
                  activation=arch["backbone.activation"])
    model = nn.Module()
    model.backbone = Backbone(dim, arch["backbone.depth"], arch["backbone.num_heads"], **common)
    part = nn.Module()
    part.tokenizer = MelTokenizer(dim, sample_rate=16000, n_mels=arch["tokenizer.n_mels"], stem="conv",
                                  front_end="whisper", pos_embed="whisper", spec_augment=None)
    part.decoder = TextDecoder(dim, 300, {"depth": arch["family.decoder.depth"],
                                          "num_heads": arch["family.decoder.num_heads"], **common},
                               max_len=SHAPE["max_target_positions"])
    model.tasks = nn.ModuleDict({"main": part})
    return model.eval()


def test_whisper_front_end_encoder_and_decoder_match_transformers():
    theirs = reference()
    state, arch = whisper_state(theirs, "hf:test-whisper")
    ours = mmtx_whisper(arch)
    ours.load_state_dict(state, strict=True)  # every tensor placed, none left over
    part = ours.tasks["main"]

    wave = torch.randn(2, 16000 * 3, generator=torch.Generator().manual_seed(0)) * 0.1  # 3 s, padded to 30 s
    features = transformers.WhisperFeatureExtractor(feature_size=80)(
        wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
    with torch.no_grad():
        frames, mask = part.tokenizer.frames(wave, None)  # (B, 3000, 80)
        front = (frames.transpose(1, 2) - features).abs().max().item()
        memory = ours.backbone(part.tokenizer.tokens(features.transpose(1, 2), mask))
        their_memory = theirs.model.encoder(features).last_hidden_state
        encoder = (memory - their_memory).abs().max().item()
        ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
        logits = part.decoder(ids, memory, None)
        their_logits = theirs(input_features=features, decoder_input_ids=ids).logits
        decoder = (logits - their_logits).abs().max().item()
    print(f"Whisper parity: log-mel {front:.2e}, encoder output {encoder:.2e}, decoder logits {decoder:.2e}")
    assert front <= TOLERANCE and encoder <= TOLERANCE and decoder <= TOLERANCE


def test_the_run_configuration_whisper_needs_is_spelled_out():
    _, arch = whisper_state(reference(), "hf:test-whisper")
    assert arch["tokenizer.front_end"] == "whisper" and arch["tokenizer.pos_embed"] == "whisper"
    assert (arch["backbone.dim"], arch["backbone.depth"], arch["family.decoder.depth"]) == (32, 2, 2)
    assert arch["backbone.norm_eps"] == 1e-5 and arch["backbone.mlp_ratio"] == 2.0


def test_a_whisper_with_trained_encoder_positions_is_named():
    model = reference()
    with torch.no_grad():
        model.model.encoder.embed_positions.weight.add_(0.5)
    with pytest.raises(ConfigError, match="encoder positions are not Whisper's sinusoids"):
        whisper_state(model, "hf:test-whisper")
