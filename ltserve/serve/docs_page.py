"""The API page a person opens first (`/`, and `/docs` where FastAPI users look): Swagger UI on this service's
OpenAPI contract, from the Swagger UI assets BentoML ships and serves (`/static_content/`), with nothing loaded
from another host.

BentoML's own page loads Google Tag Manager and leaves Swagger's validator badge on, which sends the contract's URL
to an outside validator whenever the server is reached by a name other than localhost. This page names only
same-origin files, turns the validator off (`validatorUrl: null`), and its Content-Security-Policy tells the
browser to refuse any other origin.
"""

from __future__ import annotations

import html

ASSETS = "./static_content"
"""Where BentoML serves its bundled Swagger UI (swagger-ui-bundle.js, swagger-ui-standalone-preset.js, .css)."""

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'")


def docs_page(title: str) -> bytes:
    """The page's HTML: Swagger UI reading ./docs.json, with `title`."""
    name = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{name}</title>
    <link rel="stylesheet" type="text/css" href="{ASSETS}/swagger-ui.css" />
    <link rel="icon" type="image/png" href="{ASSETS}/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{ASSETS}/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {{
        window.ui = SwaggerUIBundle({{
          url: "./docs.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          tryItOutEnabled: true,
          presets: [SwaggerUIBundle.presets.apis],
          layout: "BaseLayout",
        }});
      }};
    </script>
  </body>
</html>
""".encode()
