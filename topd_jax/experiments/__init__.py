"""The experiments: the paper's claims measured in miniature, on the synthetic task, on a CPU.

    models       the SFT'd teacher and student (cached), greedy accuracy
    protocol     distillation runs, the locator analysis, screen -> sweep -> test
    anatomy      the guidance term's gradient against OPD's (why guidance helps or hurts)
    statistics   the one paired interval, curve areas, locator precision / recall / AUC
    rendering    the Markdown tables
    demo         the README's first command (`python -m topd_jax.demo`)

`python -m topd_jax.experiments reproduce` runs the whole protocol; docs/results.md reports it.
The experiments use the library (trainer, losses, models); nothing in the library imports them.
"""
