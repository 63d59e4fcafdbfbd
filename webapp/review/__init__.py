"""Review pages: the reviewer's queue, the review form's endpoints, statistics for admins."""
