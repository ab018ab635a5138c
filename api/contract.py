"""The base of every contract that crosses a process boundary (workflow and activity I/O)."""

from pydantic import BaseModel, ConfigDict


class Contract(BaseModel):
    """Frozen; unknown fields are ignored, so a field can be added without breaking old runs."""

    model_config = ConfigDict(frozen=True)
