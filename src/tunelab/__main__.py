from tunelab.cli import app

app(prog_name="tunelab")
