"""Hugging Face models and text data (extra lrc[hf]): a tiny BERT built from a config (no
download) trains adapters from the CLI, saves, rebuilds from the lrc file alone, and exports a
directory that transformers loads; the text loader on tiny CSV/JSON-lines files."""

import csv
import importlib.util
import json
import random

import pytest
import torch

from lrc import LowRankAdam, factorize
from lrc.layers import LowRankLinear

from .test_cli import lrc

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs the hf extra (transformers)")

WORDS = {"positive": ["good", "great", "love", "fine"], "negative": ["bad", "awful", "hate", "terrible"],
         "neutral": ["car", "drive", "road", "ok"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer BERT (hidden 16) with its tokenizer in a directory, and a 3-class CSV."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for ws in WORDS.values() for w in ws]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "model")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "tweets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "text"])
        for _ in range(150):
            label = rng.choice(sorted(WORDS))
            w.writerow([label, " ".join(rng.choice(WORDS[label]) for _ in range(4))])
    return root


def test_text_loader_splits_a_file_reads_a_directory_and_jsonl(tiny, tmp_path):
    from lrc.data import build_data

    text = {"tokenizer": str(tiny / "model"), "text_column": "text", "label_column": "sentiment", "max_length": 6}
    data = build_data("text", tiny / "tweets.csv", text=text)
    assert data.num_classes == 3 and len(data.train) == 120 and len(data.test) == 30
    x, y = data.train[0]
    assert x.shape == (2, 6) and x.dtype == torch.long and 0 <= int(y) < 3
    again = build_data("text", tiny / "tweets.csv", seed=5, text=text)  # the split does not depend on the seed
    assert torch.equal(again.test.tensors[0], data.test.tensors[0])
    (tmp_path / "d").mkdir()
    rows = list(csv.DictReader(open(tiny / "tweets.csv")))
    for name, part in (("train.jsonl", rows[:100]), ("test.jsonl", rows[100:])):
        (tmp_path / "d" / name).write_text("\n".join(json.dumps(r) for r in part) + "\n")
    split = build_data("text", tmp_path / "d", text=text)
    assert len(split.train) == 100 and len(split.test) == 50
    with pytest.raises(ValueError, match="no column 'body'"):
        build_data("text", tiny / "tweets.csv", text={**text, "text_column": "body"})
    (tmp_path / "rare.csv").write_text("text,sentiment\n" + "".join(f"good car,l{i}\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"rare.csv \(its held-out 20%\): labels 'l\d', 'l\d' do not occur"):
        build_data("text", tmp_path / "rare.csv", text=text)  # every label once: the held-out two are unseen


def test_a_text_column_given_as_the_label_is_named_in_one_short_line(tmp_path):
    from lrc.data.text import text_data

    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"tweet number {i} is {'x' * 60},1\n" for i in range(600)))
    with pytest.raises(ValueError) as e:
        text_data(tmp_path / "t.csv", 0, str(tmp_path), label_column="text")
    message = str(e.value)
    assert "and 117 more do not occur" in message and "480 distinct labels in 'text'" in message
    assert "is it the label column (data.label_column)?" in message and len(message) < 400


def test_adapters_from_the_cli_train_reload_evaluate_and_export_for_transformers(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lrc.io import load_model

    preset = tmp_path / "p.yaml"
    preset.write_text(
        f"model: {{name: hf, args: {{path: {tiny / 'model'}, num_labels: 3}}}}\n"
        f"data: {{name: text, data_dir: {tiny / 'tweets.csv'}, label_column: sentiment, max_length: 6, "
        "batch_size: 16}\n"
        "factorize: {rank: 2, adapter: true, include: ['*.query', '*.key', '*.value', '*.intermediate.dense', "
        "'*.layer.?.output.dense']}\n"
        "optimizer: {method: lowrank-adam, lr: 1.0e-2, tau: 0.05, max_params: 800}\n"
        "train: {epochs: 2}\n")
    out = tmp_path / "run"
    lrc("train", "--preset", preset, "--out", out, "--quiet")
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(final["ranks"]) == 10  # 2 layers × (q, k, v, 2 feed-forward)
    head = 16 * 3 + 3
    assert final["trainable_params"] <= 800 + head  # adapters within max_params, plus the new head
    (tiny / "model").rename(tiny / "moved")  # the lrc file rebuilds without the directory
    try:
        model, meta = load_model(out / "model.safetensors")
    finally:
        (tiny / "moved").rename(tiny / "model")
    evaluated = json.loads(lrc("evaluate", out / "model.safetensors", "--json", "--no-latency").stdout)
    assert evaluated["top1"] == pytest.approx(final["test_accuracy"])
    lrc("export", out, "--dense", "--out", tmp_path / "dense")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    x = torch.randint(5, 17, (4, 2, 6))
    x[:, 1] = 1
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, model.eval()(x), atol=1e-5)
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        return
    import onnxruntime as ort

    # ONNX as a tokenizer's output feeds it: input_ids and attention_mask, any batch and length
    proc = lrc("export", out, "--onnx", tmp_path / "m.onnx")
    assert "onnxruntime agrees" in proc.stdout and "Warning" not in proc.stderr, proc.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    x = torch.randint(5, 17, (3, 2, 9))
    x[:, 1] = 1
    x[0, 1, 7:] = 0  # padding
    got = torch.from_numpy(session.run(None, {"input_ids": x[:, 0].numpy(), "attention_mask": x[:, 1].numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got, model(x), atol=1e-4)


def test_a_factorized_hf_model_trains_a_step_in_fused_mode(tiny):
    from lrc.models import build_model

    model = build_model("hf", path=str(tiny / "model"), num_labels=3)
    report = factorize(model, rank=4, exclude=["*classifier*", "*embeddings*", "*pooler*"])
    assert any(r.name.endswith("attention.self.query") for r in report.replaced)
    opt = LowRankAdam(model, lr=1e-3)
    x = torch.randint(5, 17, (4, 2, 6))
    x[:, 1] = 1
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(torch.isfinite(m.S).all() for m in model.modules() if isinstance(m, LowRankLinear))


def _preset(tiny, tmp_path, **optimizer):
    preset = tmp_path / "p.yaml"
    opt = ", ".join(f"{k}: {v}" for k, v in {"method": "lowrank-adam", "lr": 1.0e-2, "tau": 0.05, **optimizer}.items())
    preset.write_text(
        f"model: {{name: hf, args: {{path: {tiny / 'model'}, num_labels: 3}}}}\n"
        f"data: {{name: text, data_dir: {tiny / 'tweets.csv'}, label_column: sentiment, max_length: 6, "
        "batch_size: 16}\n"
        "factorize: {rank: 2, adapter: true, include: ['*.query', '*.key', '*.value', '*.intermediate.dense', "
        "'*.layer.?.output.dense']}\n"
        f"optimizer: {{{opt}}}\ntrain: {{epochs: 1}}\n")
    return preset


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")
def test_compare_runs_the_real_peft_baselines_beside_lrc_adapters(tiny, tmp_path):
    out = tmp_path / "cmp"
    proc = lrc("compare", "--preset", _preset(tiny, tmp_path, max_params=800), "--seeds", "1", "--quiet",
               "--out", out, "--methods", "lowrank-adam,peft-lora,peft-dora,peft-adalora,dense")
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"lowrank-adam", "peft-lora", "peft-dora", "peft-adalora", "dense"}
    trainable = {m: int(r["trainable_params"]) for m, r in rows.items()}
    head = 16 * 3 + 3
    # PEFT LoRA r=8 on 10 layers of the tiny BERT (q, k, v: 16→16; 16→32; 32→16) plus the head
    assert trainable["peft-lora"] == 2 * 8 * (3 * 32 + 48 + 48) + head
    assert trainable["peft-dora"] == trainable["peft-lora"] + 2 * (3 * 16 + 32 + 16)  # DoRA's magnitudes
    assert trainable["lowrank-adam"] <= 800 + head < trainable["peft-lora"]
    assert trainable["dense"] > trainable["peft-lora"]
    assert "| trainable |" in proc.stdout
    # every output is a plain Hugging Face model that lrc evaluates from its file alone
    for method in ("peft-lora", "peft-adalora"):
        result = json.loads(lrc("evaluate", out / "runs" / f"{method}-s0" / "model.safetensors", "--json",
                                "--no-latency").stdout)
        assert result["top1"] == pytest.approx(float(rows[method]["accuracy_mean"]) / 100)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")
def test_peft_methods_refuse_a_model_that_is_not_hugging_face(tmp_path):
    proc = lrc("train", "--set", "factorize.include=['1']", "--set", "optimizer.method=peft-lora",
               "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "for Hugging Face models" in proc.stderr


def _tiny_gpt2():
    from transformers import GPT2Config

    from lrc.models.hf import HFSequenceClassifier, hf_model

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, eos_token_id=0,
                        bos_token_id=0)
    torch.manual_seed(0)
    model = hf_model(config=config.to_diff_dict(), num_labels=3)
    assert isinstance(model, HFSequenceClassifier) and model.model.config.pad_token_id == 0  # padded with eos
    return model


def test_gpt2_conv1d_layers_factorize_exactly_train_reload_and_export_as_conv1d(tmp_path):
    """GPT-2 keeps its linear maps in Hugging Face's Conv1D (weight stored in × out): factorized as
    the nn.Linear they are (equal at full rank in float64), trained, saved, rebuilt from the lrc
    file, and exported as Conv1D again, loadable by transformers."""
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    from lrc.io import load_model, save_dense_pretrained, save_model

    model = _tiny_gpt2().double().eval()
    with torch.no_grad():  # weights of rank 4 (Conv1D: in × out), so that rank 4 is exact and saves parameters
        for m in model.modules():
            if isinstance(m, Conv1D):
                m.weight.copy_(torch.randn(m.weight.shape[0], 4, dtype=torch.float64)
                               @ torch.randn(4, m.weight.shape[1], dtype=torch.float64) / 4)
    x = torch.randint(1, 40, (3, 2, 7))
    x[:, 1] = 1
    with torch.no_grad():
        want = model(x)
    report = factorize(model, rank=4, include=["*c_attn", "*c_fc", "*mlp.c_proj", "*attn.c_proj"])
    assert len(report.replaced) == 8 and not any(isinstance(m, Conv1D) for m in model.modules())
    assert {r.shape for r in report.replaced} == {(48, 16), (64, 16), (16, 64), (16, 16)}  # out × in
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=0, atol=1e-10)
    model.float().train()
    opt = LowRankAdam(model, lr=1e-3, tau=0.3)
    torch.nn.functional.cross_entropy(model(x.clone()), torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert all(torch.isfinite(m.S).all() for m in model.modules() if isinstance(m, LowRankLinear))
    model.eval()
    arch = {"name": "hf", "args": {"num_labels": 3, "config": model.model.config.to_diff_dict()}}
    save_model(tmp_path / "m.safetensors", model, arch)
    again, _ = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(again.eval()(x), out, atol=1e-6)
    save_dense_pretrained(tmp_path / "dense", again)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert isinstance(hf.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, out, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")
def test_peft_lora_wraps_gpt2_conv1d_layers():
    from lrc.models.hf import apply_peft

    model = _tiny_gpt2()
    apply_peft(model, "peft-lora", ["*c_attn", "*c_fc"], ["*score*"], total_steps=10, r=2)
    adapted = [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert len(adapted) == 4  # two blocks × (c_attn, c_fc)
    x = torch.randint(1, 40, (3, 2, 7))
    x[:, 1] = 1
    assert model(x).shape == (3, 3)


def _glue(root, tiny):
    """GLUE-shaped files: RTE (a header, sentence pairs) and CoLA (no header, quotation marks unquoted)."""
    rng = random.Random(1)
    (root / "RTE").mkdir()
    (root / "CoLA").mkdir()
    for split, n in (("train", 60), ("dev", 20)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            label = rng.choice(["entailment", "not_entailment"])
            words = WORDS["positive" if label == "entailment" else "negative"]
            lines.append(f"{i}\t{rng.choice(words)} road\t{rng.choice(words)} car\t{label}")
        lines.append("99\tshort row")  # GLUE's QQP has a few: skipped
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        rows = []
        for i in range(n):
            good = rng.random() < 0.5
            word = rng.choice(WORDS["positive" if good else "negative"])
            rows.append(f"src{i}\t{int(good)}\t\t\"{word}\" car")
        (root / "CoLA" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_glue_files_pairs_headerless_tsv_and_the_task_metric(tiny, tmp_path):
    from lrc.data import build_data
    from lrc.evaluate import classification_metrics

    _glue(tmp_path, tiny)
    rte = build_data("text", tmp_path / "RTE", text={
        "tokenizer": str(tiny / "model"), "text_column": ["sentence1", "sentence2"], "label_column": "label",
        "max_length": 10, "train_file": "train.tsv", "test_file": "dev.tsv"})
    assert len(rte.train) == 60 and len(rte.test) == 20 and rte.num_classes == 2
    ids = rte.train.tensors[0][0, 0].tolist()
    assert ids.count(3) == 2  # [CLS] a [SEP] b [SEP]: the pair is tokenized as a pair
    cola = build_data("text", tmp_path / "CoLA", text={
        "tokenizer": str(tiny / "model"), "text_column": "sentence", "label_column": "label", "max_length": 8,
        "columns": ["source", "label", "original_label", "sentence"], "train_file": "train.tsv",
        "test_file": "dev.tsv"})
    assert len(cola.train) == 60 and set(cola.train.tensors[1].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="no file dev_matched.tsv"):
        build_data("text", tmp_path / "RTE", text={"tokenizer": str(tiny / "model"), "text_column": "sentence1",
                                                    "test_file": "dev_matched.tsv"})
    # Matthews correlation and F1 against their definitions
    C = torch.tensor([[5, 2], [1, 7]])
    tp, tn, fp, fn = 7, 5, 2, 1
    m = classification_metrics(C)
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert classification_metrics(torch.tensor([[4, 0], [3, 0]]))["mcc"] == 0.0  # undefined: 0
    assert classification_metrics(torch.eye(3, dtype=torch.long) * 4)["mcc"] == pytest.approx(1.0)


def test_glue_preset_trains_and_compare_reports_the_task_metric(tiny, tmp_path):
    _glue(tmp_path, tiny)
    out = tmp_path / "cmp"
    proc = lrc("compare", "--preset", "glue-cola", "--data-dir", tmp_path / "CoLA", "--seeds", "1", "--quiet",
               "--methods", "lowrank-adam", "--out", out, "--epochs", "1",
               "--set", f"model.args.path={tiny / 'model'}", "--set", "data.max_length=8",
               "--set", "optimizer.max_params=800")
    final = json.loads((out / "runs" / "lowrank-adam-s0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert -1.0 <= final["test_mcc"] <= 1.0
    row = next(csv.DictReader((out / "results.csv").open()))
    assert row["metric"] == "mcc" and float(row["score_mean"]) == pytest.approx(100 * final["test_mcc"])
    assert "test Matthews corr. [×100]" in proc.stdout
    bad = lrc("train", "--preset", "glue-rte", "--data-dir", tmp_path / "RTE", "--epochs", "1", "--out",
              tmp_path / "r", "--set", f"model.args.path={tiny / 'model'}", "--set", "data.metric=f1",
              "--set", "data.label_column=sentence1", "--quiet", check=False)
    assert bad.returncode != 0 and "f1" in bad.stderr and "Traceback" not in bad.stderr
