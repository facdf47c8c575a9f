"""The ``robotics-cd`` command line and the demo: the operator's and the newcomer's way in.

``cli.app`` assembles the command from one module per group of subcommands; ``cli.demo_story``
plays the whole release story on the sandbox. Deployment registration, ``serve`` and the
webhook receiver stay in ``deployments/``.
"""
