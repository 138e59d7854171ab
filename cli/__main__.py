from kdpipe.cli.main import app

app(prog_name="kdpipe")
