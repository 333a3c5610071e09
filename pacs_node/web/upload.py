"""``GET /upload``: the page where an operator drops a folder or a zip of DICOM files (a CD
from another hospital). The browser sends the files to STOW-RS in batches with the page's
session and CSRF token (static/upload.js); a zip is unpacked in the browser, so the server
only ever sees DICOM parts, through the same receive path as every other instance."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.web.context import web_context
from pacs_node.web.pages import page_user, render

router = APIRouter(include_in_schema=False)

Operator = Annotated[Principal, Depends(page_user(Role.OPERATOR))]


@router.get("/upload", response_class=HTMLResponse)
def upload_page(request: Request, principal: Operator) -> HTMLResponse:
    max_mb = web_context(request).settings.node.max_instance_mb
    return render(request, "upload.html", max_instance_mb=max_mb)
