"""What the classify routes accept as uploads: a multipart form with one file field, parsed once, and ltserve's
input errors as answers."""

from __future__ import annotations

from ltserve.errors import InvalidInput
from ltserve.serve.http import Answer, HttpRequest, Reject, error_answer
from ltserve.serve.multipart import MultipartError, Part, boundary_of, parse


def read_form(request: HttpRequest, field: str, max_files: int, example: str) -> list[Part]:
    """The files of multipart field `field`, parsed once; every other shape of body is a `Reject` (4xx).

    Refused: an empty body (400), another Content-Type (415), a malformed body (400), a text value in the field
    (400: a URL there is never fetched), another field (400), no file (400), more than `max_files` files (413
    too_many_images for a batch route; 400 too_many_files where `max_files` is 1).
    """
    ctype = request.header("content-type")
    if not request.body:
        raise Reject(400, "empty_body", f"the request body is empty; send multipart/form-data with a file in field "
                                        f"{field!r} ({example})")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        raise Reject(415, "unsupported_media_type", f"Content-Type {ctype or '(missing)'!r} is not accepted; send "
                                                    f"multipart/form-data with a file in field {field!r} ({example})")
    most = max_files + 16  # a few stray fields are reported as such; a flood of parts is not parsed to its end
    try:
        parts = parse(request.body, boundary_of(ctype), max_parts=most)
    except MultipartError as exc:
        if "more than" in str(exc) and max_files > 1:
            raise Reject(413, "too_many_images", f"more than {most} parts in one request; at most {max_files} "
                                                 "images (LTSERVE_MAX_BATCH_IMAGES)") from None
        raise Reject(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from None
    files = [p for p in parts if p.name == field]
    if not files:
        raise Reject(400, "missing_field", f"no file in field {field!r} (got fields {sorted({p.name for p in parts})})"
                                           f"; {example}")
    if any(p.filename is None for p in files):
        raise Reject(400, "not_a_file", f"field {field!r} must hold uploaded files, but it holds text (URLs are "
                                        "never fetched: upload the image bytes)")
    if len(files) != len(parts):
        extra = sorted({p.name for p in parts} - {field})
        raise Reject(400, "unknown_field", f"unexpected field(s) {extra}; only {field!r} is accepted")
    if len(parts) > max_files:
        if max_files == 1:
            raise Reject(400, "too_many_files", f"{request.path} takes one image, got {len(parts)}; use "
                                                "/classify_batch with repeated field 'images'")
        raise Reject(413, "too_many_images", f"{len(parts)} images in one request; at most {max_files} "
                                             "(LTSERVE_MAX_BATCH_IMAGES)")
    return parts


_INPUT_ERRORS = {400: "invalid_image", 413: "image_too_large", 415: "unsupported_format"}


def input_error_answer(exc: InvalidInput) -> Answer:
    """ltserve's input errors as answers: InvalidImage 400, ImageTooLarge 413, UnsupportedFormat 415."""
    return error_answer(exc.status_code, _INPUT_ERRORS.get(exc.status_code, "invalid_input"), str(exc))
