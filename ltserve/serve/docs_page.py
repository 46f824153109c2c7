"""The API page a person opens first (`/`, and `/docs` where FastAPI users look): Swagger UI on this service's
OpenAPI contract, from the Swagger UI assets BentoML ships and serves (`/static_content/`), with nothing loaded
from another host.

BentoML's own page loads Google Tag Manager and leaves Swagger's validator badge on, which sends the contract's URL
to an outside validator whenever the server is reached by a name other than localhost. This page names only
same-origin files, turns the validator off (`validatorUrl: null`), and its Content-Security-Policy tells the
browser to refuse any other origin.

The batch upload (`/classify_batch`, an array of `format: binary` strings): the Swagger UI BentoML bundles (5.12)
draws such an array as an empty list with an "Add string item" button, one single-file input per click, and an
item left without a file is sent as its sample value, the text "string". No spelling of the schema changes that
(the array component keys only on the items' `type`/`format`; OpenAPI 3.1's `contentMediaType` is not read there),
so the page's one plugin, `MULTI_FILE_PLUGIN`, draws that array as one `<input type="file" multiple>` whose chosen
files are the field's value: Swagger then sends each as its own `images` part.
"""

from __future__ import annotations

import html

ASSETS = "./static_content"
"""Where BentoML serves its bundled Swagger UI (swagger-ui-bundle.js, swagger-ui-standalone-preset.js, .css)."""

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'")

MULTI_FILE_PLUGIN = """
      // Swagger UI's JsonSchema_array, for an array of binary strings: one multi-file input instead of an
      // "Add string item" button per file (whose empty items are sent as the text "string"). Its value is the
      // chosen File objects as an Immutable List, the array component's own value type; any other array is
      // drawn by the original component.
      function MultiFileUpload() {
        return {
          wrapComponents: {
            JsonSchema_array: function (Original, system) {
              var React = system.React;
              return function (props) {
                var items = props.schema && props.schema.get && props.schema.get("items");
                var binary = items && items.get("type") === "string" && items.get("format") === "binary";
                if (!binary || props.disabled) {
                  return React.createElement(Original, props);
                }
                return React.createElement("input", {
                  type: "file", multiple: true, "data-ltserve": "multi-file",
                  onChange: function (event) {
                    props.onChange(system.Im.List(Array.prototype.slice.call(event.target.files)));
                  },
                });
              };
            },
          },
        };
      }"""
"""The page's Swagger UI plugin (JavaScript, inlined in the page's script; see the module docstring)."""


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
    <script>{MULTI_FILE_PLUGIN}
      window.onload = function () {{
        window.ui = SwaggerUIBundle({{
          url: "./docs.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          tryItOutEnabled: true,
          presets: [SwaggerUIBundle.presets.apis],
          plugins: [MultiFileUpload],
          layout: "BaseLayout",
        }});
      }};
    </script>
  </body>
</html>
""".encode()
