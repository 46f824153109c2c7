"""ltserve benchmarks: scripts with argparse and main(), each writing results.json, a Markdown table and a PNG."""
