"""Write a MovieLens-style ratings CSV with a planted preference (for the movielens example).

Columns: label (liked), user, movie, genres ("|"-separated), history (the user's recently
liked movies, "|"-separated, most recent first), hour, user_activity. Each user has a taste
vector, each movie a genre set and a quality; a user likes a movie more often when its genres
match the user's taste and when the movie resembles the ones in the history. Deterministic:
``python examples/movielens/make_data.py OUT.csv [ROWS]``.
"""
import sys

import numpy as np

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]


def main(path, rows=20000, seed=7):
    rng = np.random.default_rng(seed)
    users, movies = 300, 500
    taste = rng.normal(size=(users, len(GENRES)))
    movie_genres = rng.random((movies, len(GENRES))) < 0.22
    quality = rng.normal(scale=0.5, size=movies)
    liked = {u: [] for u in range(users)}
    with open(path, "w") as fh:
        fh.write("label,user,movie,genres,history,hour,user_activity\n")
        for _ in range(rows):
            u = int(rng.zipf(1.3) % users)
            m = int(rng.zipf(1.2) % movies)
            genres = [g for g, on in zip(GENRES, movie_genres[m]) if on]
            history = liked[u][:30]
            similarity = (np.mean([movie_genres[h] @ movie_genres[m] for h in history]) if history else 0.0)
            logit = 1.5 * taste[u] @ movie_genres[m] + 2.0 * quality[m] + 0.6 * similarity - 0.5
            label = int(rng.random() < 1 / (1 + np.exp(-logit)))
            hour = int(rng.integers(0, 24))
            fh.write(f"{label},u{u},{m},{'|'.join(genres)},{'|'.join(map(str, history))},{hour},"
                     f"{len(liked[u])}\n")
            if label:
                liked[u].insert(0, m)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20000)
