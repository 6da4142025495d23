"""Data Docs that render without network: the view, index builder and index renderer classes
`great_expectations.yml` names under `data_docs_sites.local_site`.

GX loads this module from its plugins directory (it puts that directory on `sys.path`).
GX's own page templates link Bootstrap, jQuery, Font Awesome and Vega from public CDNs
and a logo whose URL carries this project's data_context_id. A steward's browser must ask
no third party for anything, and the workspace may be air-gapped, so the views render
GX's own documents through the templates in `custom_data_docs/views/` (no `<script>`, no
remote `<link>` or `<img>`) styled by `custom_data_docs/styles/data_docs_custom_styles.css`.

GX does read that views directory, but only after its built-in templates, so a template
there can add a name but never replace one (jinja ChoiceLoader, GX 1.24): these views put
it first. The index gets cbh's run status (warnings do not fail a run) next to each run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder
from great_expectations.render.renderer.site_index_page_renderer import SiteIndexPageRenderer
from great_expectations.render.view.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import ChoiceLoader, FileSystemLoader

# `meta.severity` of an expectation, as pipelines/contract/validate.py writes it
CRITICAL = "critical"


class _OfflineTemplates:
    """A GX jinja view whose templates are looked up in the plugin's views directory first."""

    env: Any

    def __init__(self, custom_styles_directory: str | None = None,
                 custom_views_directory: str | None = None) -> None:
        if not custom_views_directory:
            # without the overrides every page would load its assets from the CDNs again
            raise FileNotFoundError("Data Docs: plugins/custom_data_docs/views/ is missing from the GX project")
        super().__init__(custom_styles_directory, custom_views_directory)  # type: ignore[call-arg]
        own = [FileSystemLoader(d) for d in (custom_views_directory, custom_styles_directory) if d]
        self.env.loader = ChoiceLoader([*own, self.env.loader])


class OfflinePageView(_OfflineTemplates, DefaultJinjaPageView):
    """Expectation suite and validation result pages."""


class OfflineIndexPageView(_OfflineTemplates, DefaultJinjaIndexPageView):
    """The site index."""


def run_status(result: Any) -> str:
    """'failed' (a critical expectation failed), 'warnings' or 'passed'.

    GX's own `success` is False on any failed expectation; here warnings do not fail a run.
    """
    failed = [r for r in result.results if not r.success]
    meta = [(r.expectation_config.meta or {}) if r.expectation_config else {} for r in failed]
    if any(m.get("severity", CRITICAL) == CRITICAL for m in meta):
        return "failed"
    return "warnings" if failed else "passed"


class StewardSiteIndexBuilder(DefaultSiteIndexBuilder):
    """GX's index builder; each validation link also carries cbh's run status."""

    def _add_validations_to_index_links(self, index_links_dict: OrderedDict, keys: list[Any]) -> None:
        super()._add_validations_to_index_links(index_links_dict, keys)
        for link in index_links_dict.get("validations_links", []):
            result = self.data_context.get_validation_result(
                expectation_suite_name=link["expectation_suite_name"], run_id=link["run_id"],
                batch_identifier=link["batch_identifier"],
                validation_results_store_name=self.source_stores.get("validations"))
            link["status"] = run_status(result) if hasattr(result, "results") else "?"


class StewardSiteIndexPageRenderer(SiteIndexPageRenderer):
    """GX's index renderer; the status text of a run is cbh's (the static table shows it)."""

    @classmethod
    def _generate_validation_results_link_table(cls, index_links_dict: dict[str, Any]) -> Any:
        table = super()._generate_validation_results_link_table(index_links_dict)
        for row, link in zip(table.table_data, index_links_dict.get("validations_links", []), strict=True):
            row["_validation_success_text"] = link.get("status", row["_validation_success_text"])
        return table
