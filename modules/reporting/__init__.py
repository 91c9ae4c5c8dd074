"""Stage 5, reporting: charts (PNG + CSV), the evaluation report, the chart gallery, EDA figures."""
from pathlib import Path

import jinja2

#: The Jinja2 templates in ``templates/``: HTML pages autoescaped, Markdown as written. Both render
#: ``report_body.j2``, so the report's words exist once.
HTML_TEMPLATES, TEXT_TEMPLATES = (
    jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=escape,
                       trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    for escape in (True, False))
