"""The `peer` command line: train → eval → generate → grow → info on a generated text."""
import json
import random

import pytest

from peer_model.checkpoint import load_checkpoint
from peer_model.cli import main

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--d-ff", "64", "--experts", "256", "--peer-heads", "2",
        "--top-k", "4", "--d-key", "16", "--seq-len", "32", "--max-seq-len", "64", "--warmup-steps", "2",
        "--batch-size", "4", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park".split()
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(600)))
    return path


def test_train_eval_generate_grow_info(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--text-file", str(text_file), "--out", str(run), "--steps", "6", "--eval-every", "3", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["val_bpb"] > 0
    assert len((run / "history.jsonl").read_text().splitlines()) >= 2

    assert main(["eval", str(run), "--text-file", str(text_file), "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0

    assert main(["generate", str(run), "the cat", "--max-tokens", "5", "--seed", "3", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.encode()) >= 1

    grown = tmp_path / "grown"
    assert main(["grow", str(run), "--experts", "40", "--tag", "more", "--out", str(grown)]) == 0
    capsys.readouterr()
    assert load_checkpoint(grown).peer_layers()[1].num_experts >= 256 + 40
    assert main(["info", str(grown)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["tag"] for s in info["peer_layers"]["1"]["segments"]] == ["initial", "more"]
    flops = info["flops_per_token"]
    assert flops["train"] == 3 * flops["forward"] > 0 and flops["forward"] == sum(flops["forward_by_part"].values())


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--corpus", "no-such-corpus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown corpus" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 2


def test_retrofit_train_generate_export_a_pretrained_model(text_file, tmp_path, capsys):
    """peer retrofit HF_DIR --out RUN, then the usual commands on RUN, then peer export RUN --hf OUT."""
    transformers = pytest.importorskip("transformers")
    import torch

    from hf_fixtures import build_tiny_model_dir
    from peer_model.hf import load_hf

    hf_dir = build_tiny_model_dir(tmp_path / "hf", family="llama", style="llama3")
    run = tmp_path / "run"
    assert main(["retrofit", str(hf_dir), "--out", str(run), "--experts", "256", "--peer-heads", "2", "--top-k", "4",
                 "--d-key", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "llama" and summary["peer_layers"] == [1] and summary["branch"] == "parallel"
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # function-preserving, through the checkpoint
        assert torch.equal(load_checkpoint(run)(ids), load_hf(hf_dir)(ids))

    trained = tmp_path / "trained"
    assert main(["train", "--init", str(run), "--text-file", str(text_file), "--out", str(trained), "--steps", "4",
                 "--eval-every", "2", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_bpb"] > 0
    model = load_checkpoint(trained)
    assert model.tokenizer.kind == "hf" and model.config.base_trains == "none"
    assert torch.equal(model.embed.weight, load_hf(hf_dir).embed.weight)  # the base stayed frozen

    assert main(["generate", str(trained), "the cat", "--max-tokens", "5", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["grow", str(trained), "--experts", "40", "--tag", "more"]) == 0
    capsys.readouterr()

    out = tmp_path / "exported"
    assert main(["export", str(trained), "--hf", str(out)]) == 0
    with torch.no_grad():
        assert (load_hf(out)(ids) - load_checkpoint(trained)(ids)).abs().max() < 1e-5
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
