.PHONY: test bench bench-quick demo lint docs

demo:
	./scripts/demo

test:
	./scripts/test

lint:
	.venv/bin/ruff check supervisor workers tests bench
	.venv/bin/ruff format --check supervisor workers tests bench
	.venv/bin/mypy

# docs/config.md and docs/metrics.md, generated from the config schema and the metrics table.
docs:
	.venv/bin/python -m supervisor.docgen

# Every figure in one table; docs/performance.md keeps the latest.
bench:
	[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/pip install -q -e '.[test]'
	.venv/bin/python bench/all.py --markdown docs/performance.md

bench-quick:
	.venv/bin/python bench/all.py --quick
