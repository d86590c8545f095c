"""The whole pipeline on an embedded default (`python -m launch.demo`), its report, and the local services
it, the tests and the benchmarks start: an S3 endpoint on loopback and the launchers run as a user would."""
