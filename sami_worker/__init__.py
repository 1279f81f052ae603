"""The SAMI method and the programs that run inside pods (`python -m sami_worker <stage>`)."""
