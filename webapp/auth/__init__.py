"""Sign in and out; role checks for every other blueprint."""
