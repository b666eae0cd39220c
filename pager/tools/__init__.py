"""Tools around the pager: demo, benchmarks, workload processes, status."""
