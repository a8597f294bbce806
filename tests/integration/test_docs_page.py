"""The docs page at ``/`` on a real server loads nothing from another host, and the document it shows is
rnnserve's (issue 13, finding 14: BentoML's page loaded Google Tag Manager even with
BENTOML_DO_NOT_TRACK=true)."""

from __future__ import annotations

import importlib.metadata
import re
from urllib.parse import urljoin, urlparse

# Absolute URLs that a page or stylesheet would load from another host.
URL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s"')]*""", re.IGNORECASE)
# Hosts of trackers and CDNs: none may appear even inside the Swagger UI bundle.
TRACKERS = ("googletagmanager", "google-analytics", "doubleclick.net", "unpkg.com", "jsdelivr", "cdnjs",
            "fonts.googleapis", "segment.io", "sentry.io")


def test_the_page_and_every_asset_it_references_name_no_other_host(client, server):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>rnnserve API</title>" in page.text
    assert not URL.findall(page.text), URL.findall(page.text)
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "http" not in policy
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) >= 3
    for reference in assets:
        url = urljoin(server.url + "/", reference)
        assert urlparse(url).netloc == urlparse(server.url).netloc, reference
        asset = client.get(url)
        assert asset.status_code == 200, reference
        text = asset.text
        assert not any(host in text.lower() for host in TRACKERS), reference
        if reference.endswith(".css"):  # what a stylesheet loads: url(...) and @import
            loads = re.findall(r"""url\(\s*["']?([^"')\s]+)""", text) + re.findall(r"@import", text)
            assert all(u.startswith("data:") or "//" not in u for u in loads), (reference, loads[:5])
        if "rnnserve" in reference:
            assert not URL.findall(text), reference
    script = client.get("/static_content/rnnserve-docs.js").text
    assert "validatorUrl: null" in script  # Swagger UI's only own request elsewhere: its badge


def test_the_document_is_rnnserves_with_a_tag_per_model_on_every_operation(client):
    spec = client.get("/docs.json").json()
    info = spec["info"]
    assert info["title"] == "rnnserve" and info["version"] == importlib.metadata.version("rnnserve")
    assert "BentoML" not in info["description"] and "contact" not in info
    names = [tag["name"] for tag in spec["tags"]]
    assert names == ["sentiment", "forecast", "translate", "caption", "system"]
    seen = []
    for path, item in spec["paths"].items():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                [tag] = operation["tags"]
                assert tag in names, (path, tag)
                if path.startswith("/v1/") and tag != "system":
                    assert path.startswith(f"/v1/{tag}"), (path, tag)
                seen.append(names.index(tag))
    assert seen == sorted(seen), "paths are grouped by tag in the tags' order"
    assert set(seen) == set(range(len(names)))
    sentiment = spec["paths"]["/v1/sentiment"]["post"]["requestBody"]["content"]["application/json"]
    assert sentiment["example"]
