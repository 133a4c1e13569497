"""``python -m stepopt`` runs the command line."""

from stepopt.cli import main

if __name__ == "__main__":
    main()
