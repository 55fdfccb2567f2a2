"""What the services share about datasets, caption versions, runs and uploaded archives: the
records one service writes and another reads. Stands on common/ only; never imports a service."""
