"""The offline SFT / DPO command on the tiny model, and its data errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_devstack.models import make_tiny_llama
from rlhf_jobs.offline import DataError, main, read_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("offline") / "m")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("line,needle", [
    ("not json", ":1: not JSON"),
    ("[1, 2]", ":1: expected an object"),
    ('{"prompt": "p"}', "missing field 'response'"),
    ('{"prompt": "p", "response": 3}', "'response' must be a string, got int"),
    ('{"prompt": "p", "response": "  "}', "'response' is empty"),
])
def test_bad_rows_are_reported_with_line_numbers(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(DataError, match=needle):
        read_jsonl(p, ("prompt", "response"))


def test_non_utf8_is_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(p, ("prompt",))


@pytest.mark.slow
def test_sft_then_dpo_move_the_model(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    sft_rows = [{"prompt": f"Tell me about the {w}.", "response": " The cat sings."} for w in
                ("cat", "dog", "bird", "fish", "tree", "river", "sun", "moon")]
    main(["sft", "--model", str(tiny), "--data", str(_write(tmp_path / "sft.jsonl", sft_rows)),
          "--out", str(tmp_path / "sft"), "--epochs", "8", "--lr", "1e-3", "--batch-size", "4"])
    m = json.loads((tmp_path / "sft" / "train_metrics.json").read_text())
    assert m["rows"] == 8 and m["last_loss"] < 0.5 * m["first_loss"]

    pairs = [{"prompt": r["prompt"], "chosen": " The dog runs.", "rejected": " The bird reads."} for r in sft_rows]
    main(["dpo", "--model", str(tmp_path / "sft"), "--data", str(_write(tmp_path / "dpo.jsonl", pairs)),
          "--out", str(tmp_path / "dpo"), "--epochs", "4", "--lr", "1e-3", "--batch-size", "4", "--beta", "0.1"])
    d = json.loads((tmp_path / "dpo" / "train_metrics.json").read_text())
    assert d["last_loss"] < d["first_loss"] and d["history"][-1]["accuracy"] == 1.0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo", dtype=torch.float32).eval()
    p = tok("Tell me about the cat.").input_ids
    c = tok(" The dog runs.", add_special_tokens=False).input_ids
    r = tok(" The bird reads.", add_special_tokens=False).input_ids

    def seq_lp(resp):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + resp])).logits[0], -1)
        return sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(resp))

    assert seq_lp(c) > seq_lp(r)


def test_cli_rejects_bad_data_without_training(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert "missing field 'rejected'" in str(e.value.code)
    assert not (tmp_path / "o").exists()
