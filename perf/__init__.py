"""The benchmark harness of the relay (``perf/bench``): a fake MX farm and DNS
server, the relay (or a throwaway Postfix) in the middle, and a load
generator on loopback; see perf/RESULTS.md for the figures and commands."""
