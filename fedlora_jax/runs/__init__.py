"""A run and what it leaves behind: the loop (runner.py, loop_control.py), resume, the output folder
(outdir.py, runfolder.py), checkpoints, the exported adapter and artifacts, publishing, metric
writers, reports and the model card, and generation from a run or adapter (generate.py)."""
