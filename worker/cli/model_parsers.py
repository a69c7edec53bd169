"""The model-building subcommands' arguments: teacher, corpus, train, cascade.

Their handlers are in `worker.cli.model_commands`; `worker.cli.commands` builds the rest.
"""

from __future__ import annotations

from typing import Any

from worker.cli import model_commands


def add_model_commands(commands: Any) -> None:
    """Add ``teacher``, ``corpus``, ``train`` and ``cascade`` to ``commands`` (argparse subparsers)."""
    teacher = commands.add_parser("teacher", help="the embedded teacher").add_subparsers(
        dest="teacher_command", required=True
    )
    build = teacher.add_parser("build", help="build (or verify) the cached teacher files")
    build.set_defaults(handler=model_commands.teacher_build)
    fit = teacher.add_parser("fit", help="train the teacher head on the shared labelled data")
    fit.add_argument("--out", default="models/teacher", help="directory for head, labels and card")
    fit.set_defaults(handler=model_commands.teacher_fit)
    ev = teacher.add_parser("eval", help="accuracy and macro-F1 of the teacher on labelled JSONL")
    ev.add_argument("--data", nargs="+", required=True, help="JSONL files with text, locale, intent|label")
    ev.add_argument("--split", default=None, help="only rows with this split (e.g. validation)")
    ev.add_argument("--mapping", nargs="*", help="intent→label mapping files (default: the shared ones)")
    ev.add_argument("--exclude-ambiguous", action="store_true", help="drop intents marked ambiguous")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--labels", help="a label-set file: evaluate the zero-shot teacher on it")
    ev.set_defaults(handler=model_commands.teacher_eval)
    zs = teacher.add_parser(
        "zero-shot",
        help="score texts against a label-set file (e5 zero-shot, or the NLI model in INTENT_TEACHER_DIR)",
    )
    zs.add_argument("--labels", required=True, help="the label-set file (schemas/label_set.v1.json)")
    zs.add_argument("texts", nargs="*", help="texts to score (default: one per line from --file or stdin)")
    zs.add_argument("--file", help="read texts from this file, one per line")
    zs.add_argument("--json", action="store_true", help="one JSON object per text")
    zs.set_defaults(handler=model_commands.teacher_zero_shot)
    corpus = commands.add_parser("corpus", help="distillation corpora").add_subparsers(
        dest="corpus_command", required=True
    )
    cb = corpus.add_parser("build", help="label texts with the teacher into a versioned dataset")
    cb.add_argument("--out", required=True, help="dataset directory (created or extended)")
    cb.add_argument(
        "--data", nargs="*", help="JSONL files (default: MASSIVE train + Tatoeba from the shared data)"
    )
    cb.add_argument("--split", default="train", help="rows of this split; rows without a split always count")
    cb.add_argument("--no-translations", action="store_true", help="skip the 'en' field of translation pairs")
    cb.add_argument(
        "--per-file", type=int, default=None, help="label at most this many rows of each file (default: all)"
    )
    cb.add_argument(
        "--skip-per-file",
        type=int,
        default=0,
        metavar="N",
        help="pass over the first N rows of each file: the rows after an earlier --per-file N",
    )
    cb.add_argument(
        "--held-back",
        type=float,
        default=None,
        metavar="FRACTION",
        help="label only the rows the trainer holds back at this validation fraction (e.g. 0.05): "
        "the evaluation slice of a corpus too big to label whole here",
    )
    cb.add_argument(
        "--templates",
        type=int,
        default=0,
        metavar="N",
        help="label up to N expansions per language and domain of our seed templates "
        "(worker.loop.templates: alarms and reminders, music, restaurants, weather, films, books; "
        "domains the traffic lacks), instead of --data",
    )
    cb.add_argument(
        "--template-domains",
        nargs="+",
        default=[],
        metavar="DOMAIN",
        help="with --templates: only these domains (default: all)",
    )
    cb.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="K",
        help="write K augmented variants per row (case/punctuation, code-switching) instead of the rows",
    )
    cb.add_argument(
        "--lexicon",
        type=int,
        default=0,
        metavar="K",
        help="write K word-by-word translations of each English row, into languages drawn at random, "
        "with a lexicon the teacher induces from the other rows' words, instead of the rows",
    )
    cb.add_argument(
        "--device",
        default="cpu",
        help="label on this torch device (e.g. cuda) with the embedded teacher's torch twin; "
        "needs the train extra (default: cpu, the ONNX teacher)",
    )
    cb.add_argument("--quiet", action="store_true")
    cb.set_defaults(handler=model_commands.corpus_build)

    train = commands.add_parser(
        "train", help="distil a student (cnn, bag or pruned transformer) into a model directory"
    )
    train.add_argument(
        "--arch",
        choices=["cnn", "bag", "pruned"],
        required=True,
        help="cnn: the paper's CNN (shipped); bag: mean of embeddings + MLP; pruned: teacher layers",
    )
    train.add_argument("--data", nargs="*", help="distillation dataset directories")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument(
        "--supervised",
        action="store_true",
        help="S_sup: cross-entropy on the gold labels of MASSIVE train instead of distillation",
    )
    train.add_argument("--filters", type=int, default=500, help="CNN filters per kernel size (paper: 500)")
    train.add_argument("--kernels", default="2,3,4,5,6", help="CNN kernel sizes")
    train.add_argument(
        "--embedding-dim", type=int, default=384, help="< 384 projects the teacher rows by PCA"
    )
    train.add_argument("--min-count", type=int, default=1, help="keep pieces seen at least this often")
    train.add_argument("--fraction", type=float, default=1.0, help="share of the training rows to use")
    train.add_argument(
        "--epochs", type=int, default=None, help="default 50 (pruned: 1); 0 with --init-from: none"
    )
    train.add_argument("--batch-size", type=int, default=None, help="default 128 (pruned: 32)")
    train.add_argument("--lr", type=float, default=None, help="default 1e-3 (pruned: 5e-5, encoder)")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    train.add_argument(
        "--patience", type=int, default=3, help="stop after this many epochs without improvement"
    )
    train.add_argument(
        "--min-delta",
        type=float,
        default=1e-6,
        help="an epoch improves when its validation loss beats the best by more than this",
    )
    train.add_argument(
        "--plateau-factor",
        type=float,
        default=1.0,
        help="multiply the learning rate by this after an epoch without improvement (1: constant)",
    )
    train.add_argument(
        "--sparse-embeddings",
        action="store_true",
        help="sparse gradients for the embedding table (SparseAdam): faster with a large vocabulary",
    )
    train.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    train.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    train.add_argument(
        "--max-rows-per-locale",
        type=int,
        default=None,
        metavar="N",
        help="train on about N rows of each locale at most (a share of the bigger ones, by row id)",
    )
    train.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after the epoch that would otherwise end past this many seconds of training "
        "(default: no limit); the best epoch so far is kept",
    )
    train.add_argument(
        "--disagreement-student",
        metavar="MODEL_DIR",
        default=None,
        help="weigh each training row's loss by this student's disagreement with the teacher "
        "(KL; usually the student serving now), so the next one learns most where it is wrong",
    )
    train.add_argument(
        "--disagreement-alpha",
        type=float,
        default=1.0,
        help="with --disagreement-student: weight = 1 + alpha * min(KL / mean KL, 10), mean 1 (default: 1)",
    )
    train.add_argument(
        "--embedding-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="cnn/bag: also pull a projection of the student's features to the teacher's sentence "
        "embedding (MSE + 1 - cosine), weighted W beside the logit MSE (default 0: logits only; "
        "embeds every training row with the teacher first, cached and resumable)",
    )
    train.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        default=None,
        help="cnn/bag: start from this published student's weights (read back from its model.onnx; "
        "same architecture; a changed vocabulary keeps the rows of shared pieces), e.g. the one serving",
    )
    train.add_argument(
        "--keep-characters",
        action="store_true",
        help="cnn/bag: also keep every one-character teacher piece (about 15,000: kana, hanzi, "
        "Hangul, Thai...), so a character the training data lacks gets a row of its own, mapped "
        "from the teacher's into the trained table, instead of its UTF-8 bytes",
    )
    train.add_argument(
        "--table-bits",
        type=int,
        choices=[0, 4],
        default=0,
        help="cnn/bag: 4 snaps the embedding table to 4 bits once the schedule ends, freezes it and "
        "trains the rest around it for --table-epochs more, so the INT8 model stores the table at "
        "4 bits exactly (about half its bytes); 0 (default): INT8 like every weight",
    )
    train.add_argument(
        "--table-epochs",
        type=int,
        default=2,
        metavar="N",
        help="with --table-bits 4: epochs around the frozen 4-bit table (default 2; the best is kept)",
    )
    train.add_argument(
        "--layers", default="0,11", help="pruned: teacher layers to keep, e.g. 0,11 or 0,5,11 or first4"
    )
    train.add_argument(
        "--mode",
        choices=["refit", "distil"],
        default="refit",
        help="pruned: refit the head only (L2_ends) or also distil the teacher's logits (me5s)",
    )
    train.add_argument(
        "--cosine", action="store_true", help="pruned distil: add MSE + cosine on the sentence embedding"
    )
    train.set_defaults(handler=model_commands.train)

    cascade = commands.add_parser(
        "cascade",
        help="join two students into one model directory: the first answers when sure, the rest go to the second",
    )
    cascade.add_argument("first", help="the fast student's model directory")
    cascade.add_argument("second", help="the model directory uncertain utterances escalate to")
    cascade.add_argument(
        "--escalate-below",
        type=float,
        required=True,
        metavar="MARGIN",
        help="escalate when the first student's top-2 probability margin is below this (0: never; "
        "benchmarks/cascade.py measures agreement and mean cost per threshold)",
    )
    cascade.add_argument("--out", required=True, help="model directory to write")
    cascade.set_defaults(handler=model_commands.cascade)
