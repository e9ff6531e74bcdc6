"""Allow ``python -m cli`` as an alternative to the ``zenflow`` console script."""

from cli.main import main

main()
