"""The base every stage config and recipe section derives from: strict, immutable, validated."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys and wrong types are errors that name the key (a typo must never be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
