import click


@click.group()
def main():
    """cn2mirror"""
