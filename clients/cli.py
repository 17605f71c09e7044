import typer

app = typer.Typer(help="rmdistill")
