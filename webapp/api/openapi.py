"""The OpenAPI 3.1 document of /api/v1, written by hand beside the routes it describes.

Kept true by tests/webapp/test_api_contract.py (every route of the blueprint is here, real
responses validate against these schemas) and tests/webapp/test_api_schemathesis.py
(generated requests against a live server: no 5xx, every response as documented).
Response objects are closed (``additionalProperties: false``), so a field added to a
response without adding it here fails those tests.
"""
from __future__ import annotations

from typing import Any

API_VERSION = "1.0.0"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if kind is None:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _closed(required: list[str] | None = None, optional: dict[str, Any] | None = None,
            **properties: Any) -> dict[str, Any]:
    props = dict(properties)
    props.update(optional or {})
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": required if required is not None else list(properties)}


_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


_E400 = _error("Bad request: the message says what to change (also: forbidden characters in the URL)")
_E401 = {"description": "No token, or a token that is unknown, revoked, expired or of a deactivated account",
         "headers": {"WWW-Authenticate": {"schema": _STR}}, "content": _json("Error")}
_E403 = _error("The token's user has a role that may not do this (or blinded review hides the model output)")
_E404 = _error("No such case, or not one the token's user may see (existence is not revealed)")
_E410 = _error("The case was withdrawn by its uploader or an admin: kept in the records, no longer served")
_E503 = {"description": "The database cannot be reached, is busy, or the server's disk is full (the message says which); nothing was changed. Retry after the given seconds",
         "headers": {"Retry-After": {"schema": _STR}}, "content": _json("Error")}


def _common(**responses: Any) -> dict[str, Any]:
    out = {"400": _E400, "401": _E401, "503": _E503}
    out.update({code.removeprefix("r"): value for code, value in responses.items()})
    return dict(sorted(out.items()))


_CASE_ID = {"name": "case_id", "in": "path", "required": True, "description": "The case number",
            "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}, "example": 1}


def _file_operation(kind: str, what: str, media: list[str]) -> dict[str, Any]:
    responses = {"r200": {"description": what, "content": {m: {"schema": {"type": "string", "format": "binary"}}
                                                          for m in media}},
                 "r404": _error(f"No such case, or no {kind} yet"), "r410": _E410}
    if kind != "image":
        responses["r403"] = _E403
    return {"get": {"operationId": f"get_case_{kind}", "summary": what, "tags": ["cases"],
                    "parameters": [_CASE_ID], "responses": _common(**responses)}}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": _STR, "message": _STR,
                             "rejected": {"type": "array", "items": {"$ref": "#/components/schemas/Rejected"}}}},
    "Rejected": _closed(filename=_STR, reason=_STR),
    "Me": _closed(id=_INT, email=_STR, role={"type": "string", "enum": ["clinician", "reviewer", "admin"]}),
    "ModelVersion": _closed(
        required=["name", "is_active", "threshold", "input_size", "class_names", "created_at", "activated_at",
                  "parent"],
        optional={"metrics": {"type": "object", "additionalProperties": _NUM,
                              "description": "Validation figures (admins only)"},
                  "notes": _nullable({**_STR, "description": "Admins only"})},
        name=_STR, is_active={"type": "boolean"}, threshold=_NUM, input_size=_nullable(_INT),
        class_names=_nullable({"type": "array", "items": _STR}), created_at=_TIME,
        activated_at=_nullable(_TIME), parent=_nullable(_STR)),
    "ModelList": _closed(models={"type": "array", "items": {"$ref": "#/components/schemas/ModelVersion"}}),
    "Dicom": _closed(
        modality=_nullable({**_STR, "description": "e.g. US, MG"}), manufacturer=_nullable(_STR),
        model=_nullable({**_STR, "description": "Manufacturer's model name"}),
        laterality=_nullable({**_STR, "description": "L, R, B or U (Image Laterality, else Laterality)"}),
        view=_nullable({**_STR, "description": "View Position, else the view code's meaning"}),
        body_part=_nullable(_STR),
        pixel_spacing_mm=_nullable({"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2,
                                    "description": "Row and column spacing in mm"}),
        pixel_spacing_source=_nullable({"type": "string",
                                        "enum": ["PixelSpacing", "ImagerPixelSpacing", "ultrasound region"]}),
        frames={**_INT, "minimum": 1}, frame_shown={**_INT, "minimum": 1,
                                                    "description": "The frame stored and analysed (1-based): "
                                                                   "the middle one of a clip"},
        photometric=_nullable(_STR), bits_stored=_nullable(_INT),
        voi=_nullable({**_STR, "description": "How the values were mapped to 8 bits (VOI LUT, window, stretch)"}),
        inverted={"type": "boolean", "description": "MONOCHROME1 (or INVERSE) inverted for display"},
        burned_in_annotation=_nullable({"type": "string", "enum": ["YES", "NO"],
                                        "description": "YES: text (possibly identifying) is drawn in the pixels"}),
        transfer_syntax=_nullable(_STR),
        patient_key=_nullable({**_STR, "description": "Per-site pseudonymous patient key; null unless "
                                                      "DICOM_PATIENT_KEY_SECRET is set"})),
    "Prediction": _closed(
        probability={**_NUM, "minimum": 0, "maximum": 1,
                     "description": "Calibrated probability of malignancy"},
        label={"type": "string", "enum": ["cancer", "normal"],
               "description": "cancer: suspicious for malignancy (probability at or above the threshold); "
                              "normal: not suspicious"},
        verdict={"type": "string", "enum": ["Suspicious for malignancy", "Not suspicious"]},
        threshold=_NUM,
        predicted_class=_nullable({**_STR, "description": "Three-class models: normal, benign or malignant"}),
        class_probabilities=_nullable({"type": "object", "additionalProperties": _NUM}),
        model_version=_STR,
        method={**_STR, "description": "How the heatmap was made (gradcam, gradcam++, scorecam)"},
        faithfulness=_nullable({**_NUM, "description": "Heatmap faithfulness score in [-1, 1]; null: not measured"}),
        border_share=_nullable({**_NUM, "description": "Share of heatmap mass at the image border"}),
        created_at=_TIME, updated_at=_TIME,
        heatmap_url=_nullable(_STR), overlay_url=_nullable(_STR)),
    "Case": _closed(
        required=["id", "status", "finished", "error", "original_filename", "image_format", "source_format",
                  "dicom", "width", "height",
                  "note", "uploader", "created_at", "updated_at", "started_at", "finished_at", "review_count",
                  "prediction", "prediction_hidden", "review_token", "url", "image_url"],
        optional={"sent_to_worker": {"type": "boolean", "description": "Upload answers only: false when the "
                                     "prediction service was unreachable (the case is sent later by itself)"}},
        id=_INT, status={"type": "string", "enum": ["queued", "running", "done", "failed"]},
        finished={"type": "boolean"}, error=_nullable(_STR), original_filename=_STR,
        image_format={"type": "string", "enum": ["PNG", "JPEG"], "description": "The stored image's format"},
        source_format={"type": "string", "enum": ["PNG", "JPEG", "DICOM"],
                       "description": "What was uploaded; a DICOM file is stored as the PNG of its image"},
        dicom={"anyOf": [{"$ref": "#/components/schemas/Dicom"}, {"type": "null"}],
               "description": "De-identified DICOM facts; null for PNG and JPEG uploads"},
        width=_INT, height=_INT, note=_nullable(_STR),
        uploader=_STR, created_at=_TIME, updated_at=_TIME, started_at=_nullable(_TIME),
        finished_at=_nullable(_TIME), review_count=_INT,
        prediction={"anyOf": [{"$ref": "#/components/schemas/Prediction"}, {"type": "null"}]},
        prediction_hidden={"type": "boolean", "description": "Blinded reviewer who has not given a blind read"},
        review_token=_nullable({**_STR, "description": "Reviewers: send it back with the review to record "
                                                         "the reading time"}),
        url=_STR, image_url=_STR),
    "CaseList": _closed(cases={"type": "array", "items": {"$ref": "#/components/schemas/Case"}},
                        next=_nullable({**_STR, "description": "The next page's URL; null on the last page"})),
    "UploadResult": _closed(cases={"type": "array", "items": {"$ref": "#/components/schemas/Case"}},
                            rejected={"type": "array", "items": {"$ref": "#/components/schemas/Rejected"}}),
    "ReviewRequest": {
        "type": "object", "required": ["verdict", "confidence"],
        "properties": {
            "verdict": {"type": "string", "enum": ["agree", "disagree"]},
            "label": {"type": "string", "enum": ["cancer", "normal", "malignant", "benign"],
                      "description": "Needed to disagree; optional to agree (names the class)"},
            "confidence": {"type": "string", "enum": ["certain", "probable", "unsure"]},
            "comment": {"type": "string", "maxLength": 2000},
            "review_token": {"type": "string", "description": "From the case's review_token"},
        }},
    "Review": _closed(
        id=_INT, case_id=_INT, reviewer=_STR, verdict={"type": "string", "enum": ["agree", "disagree"]},
        label={"type": "string", "enum": ["cancer", "normal"]}, detailed_label=_nullable(_STR),
        confidence=_STR, comment=_nullable(_STR),
        reading_seconds=_nullable({**_NUM, "description": "null: not measured"}),
        revision=_INT, model_version=_nullable(_STR), model_label=_nullable(_STR), submitted_at=_TIME),
}


PATHS: dict[str, Any] = {
    "/openapi.json": {"get": {"operationId": "get_openapi", "summary": "This document", "tags": ["meta"],
                              "responses": _common(r200={"description": "The OpenAPI document",
                                                         "content": {"application/json": {"schema": {"type": "object"}}}})}},
    "/me": {"get": {"operationId": "get_me", "summary": "The account the token acts as", "tags": ["meta"],
                    "responses": _common(r200={"description": "The token's user", "content": _json("Me")})}},
    "/models": {"get": {"operationId": "list_models", "summary": "Registered model versions, newest first",
                        "tags": ["models"],
                        "responses": _common(r200={"description": "Model versions", "content": _json("ModelList")})}},
    "/cases": {"get": {
        "operationId": "list_cases",
        "summary": "The cases the token's user may see, newest first (withdrawn cases are not listed)",
        "tags": ["cases"],
        "parameters": [
            {"name": "status", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["queued", "running", "done", "failed"]}},
            {"name": "limit", "in": "query", "required": False, "description": "Cases per page (default 25)",
             "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            {"name": "before", "in": "query", "required": False,
             "description": "Only cases numbered below this one (the next link sets it)",
             "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}}],
        "responses": _common(r200={"description": "One page of cases", "content": _json("CaseList")})},
        "post": {
        "operationId": "create_cases", "summary": "Upload images; one queued case per accepted file",
        "tags": ["cases"],
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "note": {"type": "string", "maxLength": 2000}}},
            "encoding": {"images": {"contentType": "image/png, image/jpeg, application/dicom"}}}}},
        "responses": _common(
            r201={"description": "The accepted files' cases (and the rejected files, with reasons)",
                  "headers": {"Location": {"schema": _STR, "description": "Only when one case was created"}},
                  "content": _json("UploadResult")},
            r403=_error("Only clinicians and admins upload"),
            r413=_error("The request is larger than MAX_UPLOAD_MB; nothing was stored"))}},
    "/cases/{case_id}": {"get": {
        "operationId": "get_case", "summary": "A case's status and its latest prediction", "tags": ["cases"],
        "parameters": [_CASE_ID],
        "responses": _common(r200={"description": "The case", "content": _json("Case")}, r404=_E404,
                             r410=_E410)}},
    "/cases/{case_id}/image": _file_operation("image", "The stored image (for a DICOM upload, the PNG of its "
                                                       "de-identified image)", ["image/png", "image/jpeg"]),
    "/cases/{case_id}/heatmap": _file_operation("heatmap", "The latest prediction's heatmap (PNG)", ["image/png"]),
    "/cases/{case_id}/overlay": _file_operation("overlay", "The heatmap over the image (PNG)", ["image/png"]),
    "/cases/{case_id}/reviews": {"post": {
        "operationId": "create_review", "summary": "Agree or disagree with the latest prediction (again: revise)",
        "tags": ["reviews"], "parameters": [_CASE_ID],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ReviewRequest"}}}},
        "responses": _common(
            r200={"description": "The review, revised", "content": _json("Review")},
            r201={"description": "The review, first recorded", "content": _json("Review")},
            r403=_error("Only reviewers and admins review; blinded reviewers give their blind read on the page"),
            r404=_E404, r410=_E410,
            r409=_error("The case has no finished prediction yet"))}},
}


def openapi_document() -> dict[str, Any]:
    """The whole document (a new dict each call)."""
    import copy

    return {
        "openapi": "3.1.0",
        "info": {"title": "Breast-review API", "version": API_VERSION,
                 "description": "Research software, not for clinical use. Bearer tokens from "
                                "'manage.py tokens create'; the token's user's role decides, as on the pages. "
                                "See docs/api.md."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "paths": copy.deepcopy(PATHS),
        "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
                       "schemas": copy.deepcopy(SCHEMAS)},
    }
