"""The base every stage config and recipe section derives from: strict, immutable, validated."""

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    """Unknown keys and wrong types are errors that name the key (a typo must never be ignored); a key that was
    renamed is refused with its new name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    renamed: ClassVar[dict[str, str]] = {}
    """Old key -> what replaces it, for keys earlier versions of calq accepted."""

    @model_validator(mode="before")
    @classmethod
    def _check_renamed(cls, data: Any) -> Any:
        cls.refuse_renamed(data)
        return data

    @classmethod
    def refuse_renamed(cls, data: Any) -> None:
        if isinstance(data, dict):
            for old, new in cls.renamed.items():
                if old in data:
                    raise ValueError(f"key '{old}' was renamed: use {new}")
