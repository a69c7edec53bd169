"""The one typed settings object, built once at start-up from ``INTENT_*`` variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "intent-worker"


class Settings(BaseSettings):
    """Every knob of intent-worker; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="INTENT_", frozen=True, extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where built artefacts (the teacher encoder) are cached.",
    )
    teacher_dir: Path = Field(
        default=MODELS_DIR / "teacher", description="Teacher head, labels and card (or a user ONNX teacher)."
    )
    teacher_threads: int = Field(default=2, ge=1, description="onnxruntime threads for the teacher.")
    teacher_max_length: int = Field(
        default=512, ge=8, le=512, description="Teacher input length in tokens, specials included."
    )
    teacher_batch_tokens: int = Field(
        default=8192, ge=512, description="Token budget of one teacher batch (memory bound)."
    )
    shared_data_dir: Path = Field(
        default=REPO_ROOT.parent / "shared" / "data", description="Development data sets (read in place)."
    )
