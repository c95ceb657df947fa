"""Renders and lints lb's chart with Helm's own engine (helm-python-sdk: Helm v4's Go SDK).

Reads {"chart", "values", "release", "namespace"} as JSON on stdin; writes {"lint", "manifests"}
or {"error"} as JSON on stdout. Values are checked against values.schema.json first, as
`helm install` does, so a bad value fails here with Helm's own message.
"""

import json
import sys

import helm_python


def main() -> int:
    req = json.load(sys.stdin)
    values = req["values"]
    try:
        with helm_python.Chart.load(req["chart"]) as chart:
            chart.validate_schema(chart.merge_values(values))
            manifests = chart.render(
                values, name=req["release"], namespace=req["namespace"], is_install=True
            )
            crds = [c["data"] for c in chart.crds]
        lint = helm_python.lint(req["chart"], values, strict=True, namespace=req["namespace"])
    except helm_python.HelmError as e:
        json.dump({"error": str(e)}, sys.stdout)
        return 0
    json.dump({"lint": lint, "manifests": manifests, "crds": crds}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
