"""Stage 7 of the main path: a predictions folder as a validated `ID,labels` submission (`make submit`)."""
