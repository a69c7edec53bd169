"""The NLI teacher adapter, on a tiny NLI model this test builds and exports itself.

The model (onnx.helper, no weights from anywhere): word vectors summed over the premise
(token type 0) and over the hypothesis (token type 1); the entailment logit is their dot
product, contradiction its negative, neutral 0. Its classes are ordered contradiction,
entailment, neutral, so an adapter that assumed "entailment is last" would pick neutral.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from worker.errors import BadInput, ModelError
from worker.teacher.label_set import LabelSet
from worker.teacher.nli import NliTeacher, entailment_index

# Topic axes: 0 device, 1 memory, 2 chat.
PREMISE_WORDS = {"lights": 0, "music": 0, "volume": 0, "my": 1, "yesterday": 1, "hello": 2, "joke": 2}
HYPOTHESIS_WORDS = {"device": 0, "memory": 1, "chat": 2}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
FILLER = ["turn", "on", "the", "up", "what", "did", "say", "there", "tell", "me", "a", "this", "is", "about"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + FILLER + list(PREMISE_WORDS) + list(HYPOTHESIS_WORDS))}
CLASSES = ["contradiction", "entailment", "neutral"]


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    return tok


def _vectors(words: dict[str, int], scale: float) -> np.ndarray:
    table = np.zeros((len(VOCAB), 3), np.float32)
    for word, axis in words.items():
        table[VOCAB[word], axis] = scale
    return table


def _graph(n_classes: int = 3, with_types: bool = True) -> onnx.ModelProto:
    """logits = [-a·b, a·b, 0] where a, b are the summed premise / hypothesis vectors."""
    premise, hypothesis = _vectors(PREMISE_WORDS, 1.0), _vectors(HYPOTHESIS_WORDS, 2.0)
    inits = [
        numpy_helper.from_array(premise, "EA"),
        numpy_helper.from_array(hypothesis, "EB"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Gather", ["EA", "input_ids"], ["ea"]),
        helper.make_node("Gather", ["EB", "input_ids"], ["eb"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
    ]
    if with_types:
        nodes.append(helper.make_node("Cast", ["token_type_ids"], ["t"], to=TensorProto.FLOAT))
    else:  # no segment input: everything counts as hypothesis and premise alike
        nodes.append(helper.make_node("Mul", ["m", "one"], ["t"]))
    nodes += [
        helper.make_node("Sub", ["one", "t"], ["not_t"]),
        helper.make_node("Mul", ["m", "not_t"], ["wa0"]),
        helper.make_node("Mul", ["m", "t"], ["wb0"]),
        helper.make_node("Unsqueeze", ["wa0", "ax2"], ["wa"]),
        helper.make_node("Unsqueeze", ["wb0", "ax2"], ["wb"]),
        helper.make_node("Mul", ["ea", "wa"], ["ya"]),
        helper.make_node("Mul", ["eb", "wb"], ["yb"]),
        helper.make_node("ReduceSum", ["ya", "ax1"], ["a"], keepdims=0),
        helper.make_node("ReduceSum", ["yb", "ax1"], ["b"], keepdims=0),
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("ReduceSum", ["ab", "ax1"], ["ent"], keepdims=1),
        helper.make_node("Neg", ["ent"], ["con"]),
        helper.make_node("Sub", ["ent", "ent"], ["neu"]),
        helper.make_node("Concat", ["con", "ent", "neu"][:n_classes], ["logits"], axis=1),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])
    graph = helper.make_graph(
        nodes, "tiny-nli", [ids, mask, types] if with_types else [ids, mask], [out], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _export(
    directory: Path, *, classes: list[str] = CLASSES, n_classes: int = 3, with_types: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(_graph(n_classes, with_types), str(directory / "model.onnx"))
    _tokenizer().save(str(directory / "tokenizer.json"))
    config = {"id2label": {str(i): name for i, name in enumerate(classes)}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _labels(order: tuple[str, ...] = ("Action", "Recall", "Other"), **extra: object) -> LabelSet:
    topics = {"Action": "device", "Recall": "memory", "Other": "chat"}
    return LabelSet.from_json(
        {
            "schema_version": 1,
            "name": "tiny",
            "hypothesis_templates": ["this is about {description}"],
            "labels": [{"name": n, "descriptions": [topics[n]]} for n in order],
            **extra,
        }
    )


TEXTS = ["turn on the lights", "what did my alarm say yesterday", "hello there tell me a joke"]


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("nli") / "tiny")


def test_entailment_scores_pick_each_label_in_label_set_order(nli_dir: Path) -> None:
    teacher = NliTeacher.from_directory(nli_dir, _labels())
    assert teacher.labels == ("Action", "Recall", "Other")
    assert teacher.entailment == 1
    assert [teacher.labels[i] for i in teacher.logits(TEXTS).argmax(axis=1)] == ["Action", "Recall", "Other"]
    reordered = NliTeacher.from_directory(nli_dir, _labels(("Other", "Action", "Recall")))
    assert [reordered.labels[i] for i in reordered.logits(TEXTS).argmax(axis=1)] == [
        "Action",
        "Recall",
        "Other",
    ]


def test_logits_are_the_centred_entailment_logit_of_each_pair(nli_dir: Path) -> None:
    teacher = NliTeacher.from_directory(nli_dir, _labels())
    # "turn on the lights": premise vector [1,0,0]; hypotheses device/memory/chat scale 2.
    np.testing.assert_allclose(teacher.logits(TEXTS[:1])[0], np.array([2.0, 0.0, 0.0]) - 2 / 3, atol=1e-6)


def test_several_templates_average_and_cost_one_pair_each(nli_dir: Path) -> None:
    label_set = _labels(
        hypothesis_templates=["this is about {description}", "about {description} {description}"]
    )
    teacher = NliTeacher.from_directory(nli_dir, label_set)
    assert teacher.pairs_per_utterance == 6
    # The second template counts the topic word twice: mean of 2 and 4 is 3 for the match.
    np.testing.assert_allclose(teacher.logits(TEXTS[:1])[0], np.array([3.0, 0.0, 0.0]) - 1.0, atol=1e-6)
    single = NliTeacher.from_directory(nli_dir, _labels())
    assert single.pairs_per_utterance == 3


def test_batching_under_a_small_token_budget_changes_nothing(nli_dir: Path) -> None:
    texts = [t * k for t in (TEXTS[0] + " ", TEXTS[1] + " ", TEXTS[2] + " ") for k in (1, 3, 7)]
    big = NliTeacher.from_directory(nli_dir, _labels(), batch_tokens=8192).logits(texts)
    small = NliTeacher.from_directory(nli_dir, _labels(), batch_tokens=16).logits(texts)
    np.testing.assert_allclose(small, big, atol=1e-5)
    chunks = list(NliTeacher.from_directory(nli_dir, _labels()).iter_logits(texts, chunk_size=6))
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 1]
    np.testing.assert_allclose(np.concatenate(chunks), big, atol=1e-5)


def test_a_long_premise_is_cut_and_the_hypothesis_kept(tmp_path: Path) -> None:
    directory = _export(tmp_path / "m")
    (directory / "teacher.json").write_text(json.dumps({"max_length": 12}))
    teacher = NliTeacher.from_directory(directory, _labels())
    long_text = "turn on the lights " + "the " * 200
    assert teacher.labels[int(teacher.logits([long_text]).argmax())] == "Action"


def test_models_without_token_types_and_a_named_entailment_class(tmp_path: Path) -> None:
    classes = ["CONTRADICTION", "ENTAILMENT", "NEUTRAL"]
    directory = _export(tmp_path / "m", classes=classes, with_types=False)
    teacher = NliTeacher.from_directory(directory, _labels())
    assert teacher.entailment == 1 and teacher.logits(TEXTS).shape == (3, 3)
    (directory / "config.json").unlink()
    (directory / "labels.json").write_text(json.dumps(["no", "yes", "maybe"]))
    (directory / "teacher.json").write_text(json.dumps({"entailment": "yes", "id": "mine"}))
    teacher = NliTeacher.from_directory(directory, _labels())
    assert teacher.entailment == 1 and teacher.identity.startswith("mine-nli@")


def test_the_label_set_is_part_of_the_identity(nli_dir: Path) -> None:
    a = NliTeacher.from_directory(nli_dir, _labels())
    b = NliTeacher.from_directory(nli_dir, _labels(("Other", "Action", "Recall")))
    assert a.identity != b.identity and a.label_set_id != b.label_set_id


def test_non_string_input_is_bad_input(nli_dir: Path) -> None:
    with pytest.raises(BadInput):
        NliTeacher.from_directory(nli_dir, _labels()).logits([None])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_config", "needs config.json"),
        ("no_entailment", "no single class named 'entailment'"),
        ("bad_index", "outside the 3 classes"),
        ("width", "outputs 2 classes but the config names 3"),
        ("missing_mask", "lacks inputs ['attention_mask']"),
        ("corrupt", "cannot load"),
        ("no_post_processor", "no post-processor"),
        ("no_tokenizer", "does not exist"),
        ("bad_config", "needs 'id2label'"),
    ],
)
def test_a_malformed_model_is_refused_with_a_clear_error(tmp_path: Path, breakage: str, message: str) -> None:
    directory = _export(tmp_path / "m", n_classes=2 if breakage == "width" else 3)
    if breakage == "no_config":
        (directory / "config.json").unlink()
    elif breakage == "no_entailment":
        (directory / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    elif breakage == "bad_index":
        (directory / "teacher.json").write_text(json.dumps({"entailment": 3}))
    elif breakage == "missing_mask":
        model = _graph()
        model.graph.input[1].name = "mask"
        model.graph.node[2].input[0] = "mask"
        onnx.save(model, str(directory / "model.onnx"))
    elif breakage == "corrupt":
        (directory / "model.onnx").write_bytes(b"not an onnx file")
    elif breakage == "no_post_processor":
        tok = _tokenizer()
        tok.post_processor = None
        tok.save(str(directory / "tokenizer.json"))
    elif breakage == "no_tokenizer":
        (directory / "tokenizer.json").unlink()
    elif breakage == "bad_config":
        (directory / "config.json").write_text(json.dumps({"id2label": {"0": "entailment", "2": "x"}}))
    with pytest.raises(ModelError, match=re.escape(message)):
        NliTeacher.from_directory(directory, _labels())


def test_entailment_index_reads_names_and_overrides() -> None:
    assert entailment_index(["entailment", "neutral", "contradiction"]) == 0
    assert entailment_index(["a", "b"], 1) == 1
    with pytest.raises(ModelError):
        entailment_index(["entailment", "Entailment"])
