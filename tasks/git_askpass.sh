#!/bin/sh
# GIT_ASKPASS of robotics-cd (tasks/gitcmd.py): answers git's prompts from the environment
# of the git process, so a token never appears in argv, in a URL or in a file.
case "$1" in
  Username*) printf '%s\n' "${ROBOTICS_CD_GIT_USERNAME:-}" ;;
  *) printf '%s\n' "${ROBOTICS_CD_GIT_PASSWORD:-}" ;;
esac
