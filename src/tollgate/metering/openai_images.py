"""Usage parser for the OpenAI Images API (``/v1/images/generations|edits|variations``).

Non-streaming: the ``ImagesResponse`` body; its ``data`` lists the images made
(``units["images"]``) and, for the GPT image models only, ``usage`` {``input_tokens``,
``input_tokens_details`` {``text_tokens``, ``image_tokens``}, ``output_tokens``,
``total_tokens``}. DALL·E responses have no ``usage``: their tokens stay None.

Streaming (``stream: true``, GPT image models): ``image_generation.partial_image`` /
``image_edit.partial_image`` events carry previews only; each ``image_generation.completed``
/ ``image_edit.completed`` event is one final image and carries ``usage``.

The response names no model; the request's model stands in (see :class:`JsonOrSSEParser`).
References: https://developers.openai.com/api/docs/api-reference/images/create and
https://developers.openai.com/api/reference/resources/images/edit-streaming-events
"""

from __future__ import annotations

from typing import Any

from tollgate.metering.framing import JsonOrSSEParser
from tollgate.metering.openai_responses import responses_usage

__all__ = ["OpenAIImagesParser"]

_COMPLETED_EVENTS = frozenset({"image_generation.completed", "image_edit.completed"})


class OpenAIImagesParser(JsonOrSSEParser):
    """Images: ``usage`` when the model reports it, and the number of images made."""

    def _document(self, doc: dict[str, Any], event: str | None) -> None:
        if event is None:
            data = doc.get("data")
            if isinstance(data, list):
                self.units["images"] = len(data)
            if "usage" in doc:
                self.take_usage(responses_usage(doc["usage"]))
            return
        kind = doc.get("type")
        if not isinstance(kind, str):
            kind = event
        if kind in _COMPLETED_EVENTS:
            self.units["images"] = self.units.get("images", 0) + 1
            if "usage" in doc:
                self.take_usage(responses_usage(doc["usage"]))
