"""Shared base for the typed views of the CRDs: camelCase on the wire, snake_case in Python."""

from __future__ import annotations

import datetime as dt
import re

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A part of a Pollinate resource, as the CRD in `crds/` defines it.

    Field names are the CRD's in snake_case; `tests/unit/operator/test_api_matches_crds.py`
    checks every field, type, enum and default here against the CRD schema, so the CRD stays
    the one definition of the API.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_wire(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def merge_patch_over(self, stored: dict | None) -> dict:
        """The JSON merge patch that makes `stored` say what this model says.

        A merge patch leaves keys it does not mention alone, so a field of ours that is now
        unset (a suspended round's runId) is sent as null, which deletes it; keys that are
        not ours (kopf keeps its own in status) are not touched. Keys that already say the
        same are left out too: a pass that changed nothing sends no patch at all (kopf skips
        an empty one), where it used to cost the API server a no-op write per pass.
        """
        wire = self.to_wire()
        stored = stored or {}
        ours = {f.alias or name for name, f in type(self).model_fields.items()}
        full = {**{k: None for k in stored if k in ours and k not in wire}, **wire}
        return {k: v for k, v in full.items() if k not in stored or stored[k] != v}

    @classmethod
    def from_stored(cls, raw: dict | None):
        """Read a stored status, ignoring keys that are not ours (kopf keeps its own there)."""
        raw = raw or {}
        aliases = {f.alias or name for name, f in cls.model_fields.items()}
        return cls.model_validate({k: v for k, v in raw.items() if k in aliases})


_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str, field: str) -> dt.timedelta:
    """A Go-style duration as the CRDs write them (`8760h`, `90m`, `1h30m`, `0s`); the error
    names the field."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{field}: {text!r} is not a duration; expected hours, minutes and "
                         "seconds such as 720h, 90m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return dt.timedelta(hours=hours, minutes=minutes, seconds=seconds)
