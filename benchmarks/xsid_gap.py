"""Where the students miss the teacher on xSID, and whether the traffic could have taught them.

For each xSID target language and each student given:
- agreement with the teacher, and the disagreements by xSID intent and by (teacher, student)
  label pair;
- the share of the student's tokens that are byte fallback (characters its vocabulary lacks);
and, once per language, how many rows of ``../shared/data/traffic/<lang>.jsonl`` hold a word for
an alarm or a reminder (the word list is ours, below), against how many xSID rows are about
alarms or reminders. Writes benchmarks/results/xsid_gap.json.
    .venv/bin/python benchmarks/xsid_gap.py models/student build/exp/chars
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, write_result
from multilingual import XSID_TARGETS
from tokenizers import Tokenizer

from worker.config import Settings
from worker.data.corpora import language_of, load_labelled, require_shared_data, shared_mapping, xsid_files
from worker.loop.gate import golden_from_labelled
from worker.models.student import Student, chunked_logits
from worker.teacher import load_teacher

#: Words for an alarm, a reminder or a wake-up call, per language (lower case; ours, not the data's).
ALARM_WORDS = {
    "ar": ("منبه", "تذكير", "ذكرني", "أيقظني"),
    "de": ("wecker", "erinner", "weck mich"),
    "en": ("alarm", "remind", "wake me"),
    "id": ("alarm", "pengingat", "ingatkan", "bangunkan"),
    "it": ("sveglia", "promemoria", "ricorda", "svegliami"),
    "ja": ("アラーム", "リマインダー", "目覚まし", "起こして", "リマインド"),
    "nl": ("wekker", "herinner", "maak me wakker"),
    "tr": ("alarm", "hatırlat", "uyandır"),
    "zh": ("闹钟", "提醒", "叫醒"),
}
ALARM_INTENTS = ("alarm/", "reminder/")


def traffic_hits(shared: Path, language: str) -> dict[str, int]:
    """Rows of the language's traffic file, and those holding one of its alarm words."""
    words = ALARM_WORDS[language]
    rows = hits = 0
    with (shared / "traffic" / f"{language}.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            text = str(json.loads(line)["text"]).lower()
            rows += 1
            hits += any(word in text for word in words)
    return {"rows": rows, "alarm_or_reminder_rows": hits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("students", nargs="+", type=Path, help="model directories to score")
    parser.add_argument("--out", default="xsid_gap")
    args = parser.parse_args()
    settings = Settings()
    shared = require_shared_data(settings.shared_data_dir)
    teacher = load_teacher(settings)
    xsid = load_labelled(xsid_files(shared), shared_mapping(shared), split="validation")
    golden = golden_from_labelled(
        xsid.texts, xsid.locales, xsid.gold(teacher.labels), teacher, settings.cache_dir
    )
    teacher_labels = np.argmax(golden.teacher_logits, 1)
    languages = np.array([language_of(locale) for locale in xsid.locales])
    result: dict[str, Any] = {"machine": machine(), "teacher": teacher.identity, "languages": {}}
    for language in XSID_TARGETS:
        rows = np.flatnonzero(languages == language)
        about_alarms = sum(xsid.intents[i].startswith(ALARM_INTENTS) for i in rows)
        result["languages"][language] = {
            "xsid_rows": int(rows.size),
            "xsid_alarm_or_reminder_rows": int(about_alarms),
            "traffic": traffic_hits(shared, language),
        }
    result["models"] = {}
    for directory in args.students:
        student = Student(directory, threads=1)
        student_labels = np.argmax(chunked_logits(xsid.texts, student, 64), 1)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        per_language: dict[str, Any] = {}
        for language in XSID_TARGETS:
            rows = np.flatnonzero(languages == language)
            missed = [int(i) for i in rows if student_labels[i] != teacher_labels[i]]
            tokens = [t for i in rows for t in tokenizer.encode(xsid.texts[i]).tokens]
            pairs = Counter(
                f"{teacher.labels[teacher_labels[i]]}->{teacher.labels[student_labels[i]]}" for i in missed
            )
            per_language[language] = {
                "agreement": round(1 - len(missed) / max(rows.size, 1), 4),
                "byte_token_share": round(sum(t.startswith("<0x") for t in tokens) / max(len(tokens), 1), 4),
                "missed": len(missed),
                "missed_alarm_or_reminder": sum(xsid.intents[i].startswith(ALARM_INTENTS) for i in missed),
                "missed_by_intent": dict(Counter(xsid.intents[i] for i in missed).most_common(6)),
                "missed_by_labels": dict(pairs.most_common()),
            }
        result["models"][str(directory)] = {"version": student.version, "per_language": per_language}
        print(json.dumps({str(directory): {k: v["agreement"] for k, v in per_language.items()}}))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
