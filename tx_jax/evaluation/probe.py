"""How much label information frozen features carry: linear probe, k-NN, k-means NMI.

One protocol for every feature kind (raw pixels, random or trained encoders),
so the numbers compare: fit on the train features, score on the test
features; k-means on all of them with k = the number of classes.
"""

import numpy as np


def probe_metrics(train_x, train_y, test_x, test_y, knn_k: int = 20,
                  seed: int = 0) -> dict[str, float]:
  """{"linear_probe_accuracy", "knn_accuracy", "kmeans_nmi"} of features [N, D].

  - linear probe: standardised features -> multinomial logistic regression
    (L2, C = 1), accuracy on the test features;
  - k-NN: majority vote of the `knn_k` nearest train features by cosine
    distance, accuracy on the test features;
  - k-means NMI: k-means (k = number of classes, 10 k-means++ restarts) on
    train + test features, normalised mutual information with the labels.
  """
  from sklearn.cluster import KMeans
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import normalized_mutual_info_score
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  train_x, test_x = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (train_x, test_x))
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  probe.fit(train_x, train_y)
  knn = KNeighborsClassifier(n_neighbors=min(knn_k, len(train_x)), metric="cosine")
  knn.fit(train_x, train_y)
  all_x, all_y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
  k = len(np.unique(all_y))
  clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(all_x)
  return {"linear_probe_accuracy": float(probe.score(test_x, test_y)),
          "knn_accuracy": float(knn.score(test_x, test_y)),
          "kmeans_nmi": float(normalized_mutual_info_score(all_y, clusters))}
