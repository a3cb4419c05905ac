"""The APO game: the schedule table (`schedules`: one row per arm), the game over it (`loop`), its
phases as plain functions (`phases`) and the run store that memoises and resumes them (`store`)."""
