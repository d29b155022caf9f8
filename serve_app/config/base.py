"""The base of every config model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Config is written by operators: a misspelt key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")
