"""`make bench`: the /token service against a bare baseline app under the same load (issue 7)."""
