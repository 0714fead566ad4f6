"""Whisper's weights on mmtx's encoder-decoder (mmtx.interop.whisper), offline: a WhisperForConditionalGeneration with
random weights from a small config stands in for the hub's; its front end, encoder output and decoder logits
are compared with mmtx's in fp32 on the CPU."""

import pytest
import torch
from torch import nn

from mmtx.backbone import Backbone
from mmtx.errors import ConfigError
from mmtx.tasks.seq2seq import TextDecoder
from mmtx.tokenizers.audio import MelTokenizer
from mmtx.interop.whisper import whisper_state

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


@pytest.fixture(scope="module")
def whisper_root(tmp_path_factory):
    from conftest import whisper_reference
    from test_audio import make_tones

    root = tmp_path_factory.mktemp("whisper_data")
    make_tones(root / "fsdd" / "recordings", per_class=(17, 3))
    return root, whisper_reference(root / "whisper")


def test_whisper_finetune_transcribes_as_transformers_greedy_does(whisper_root, tmp_path):
    """The shipped task, built from its config and initialised from the reference: every tensor loaded, and its
    greedy transcription after Whisper's prompt the same tokens as transformers' model fed back its own argmax."""
    from conftest import whisper_small_run
    from mmtx import build, compose
    from mmtx.batch import AudioBatch
    from mmtx.training.transfer import init_from

    from mmtx.interop.registry import load_pretrained, take_architecture

    root, ref = whisper_root
    cfg = compose("whisper_finetune", whisper_small_run(tmp_path, root, ref))
    taken = take_architecture(cfg, load_pretrained(f"hf:{ref}"), compose("whisper_finetune"))  # as a run does
    assert {"backbone.dim", "family.decoder.depth", "tokenizer.front_end", "data.tgt_vocab.name"} <= set(taken)
    model, data = build(cfg)
    table = init_from(model, f"hf:{ref}")
    assert not table["new"] and not table["skipped"] and not table["unused"]
    model.eval()
    part = model.tasks["main"]
    theirs = transformers.WhisperForConditionalGeneration.from_pretrained(ref).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ref)
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert [part.bos_id, *part.prefix_ids] == prompt

    # training batches: the decoder reads BOS + prompt + text, and learns the text and EOS, not the prompt
    from mmtx.batch import IGNORE_INDEX

    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    tokens, targets = batch.target.tokens, batch.target.targets
    assert tokens[:, :4].tolist() == [prompt] * tokens.shape[0]
    assert (targets[:, :3] == IGNORE_INDEX).all()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row_in, row_out in zip(tokens, targets):
        learned = row_out[row_out != IGNORE_INDEX].tolist()
        assert learned[-1] == eos and learned[:-1] == row_in[4:4 + len(learned) - 1].tolist()
        assert tokenizer.decode(learned[:-1]) in ("zero", "one")

    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(2)) * 0.1
    features = transformers.WhisperFeatureExtractor.from_pretrained(ref)(
        wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):  # transformers' greedy reference: no cache, its own argmax fed back
            nxt = theirs(input_features=features, decoder_input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    theirs_new = ids[0, len(prompt):].tolist()
    theirs_new = theirs_new[:theirs_new.index(eos)] if eos in theirs_new else theirs_new
    ours = part.decode(model.backbone, AudioBatch(wave, torch.tensor([16000])), beam_size=1, max_len=len(prompt) + 9)  # positions: 10 new tokens
    assert ours[0] == theirs_new


def test_a_whisper_run_trains_and_generate_transcribes_from_its_checkpoint(whisper_root, tmp_path):
    from conftest import whisper_small_run
    from mmtx import compose
    from mmtx.generate import main as generate
    from mmtx.train import train

    root, ref = whisper_root
    args = [*whisper_small_run(tmp_path, root, ref), "trainer.max_steps=3", "trainer.max_epochs=-1"]
    summary = train(compose("whisper_finetune", args), run_dir=tmp_path / "run")
    assert "test/wer" in summary
    from omegaconf import OmegaConf

    ran = OmegaConf.load(tmp_path / "run" / "config.yaml")  # the run's configuration: what the weights dictate
    assert (ran.backbone.dim, ran.tokenizer.front_end, ran.data.tgt_vocab.name) == (32, "whisper", str(ref))
    with pytest.raises(ConfigError, match=r"backbone.dim=64 here, 32 in the weights"):  # chosen, and contradicted
        train(compose("whisper_finetune", [*args, "backbone.dim=64"]), run_dir=tmp_path / "wide")
    clip = sorted((root / "fsdd" / "recordings").glob("*.wav"))[0]
    texts = generate([f"ckpt={summary['last_checkpoint']}", f"audio={clip}", "device=cpu"])
    assert len(texts) == 1 and isinstance(texts[0], str)
